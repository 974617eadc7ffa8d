"""Fuzz harnesses (issue 7). Each test module defines ``HARNESSES``: pytest runs each with a
small CI budget, ``bench/fuzz.py --minutes N`` runs them for longer and counts inputs."""
