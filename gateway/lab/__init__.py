"""Network-namespace lab: a gateway, devices and a fake internet on one machine."""
