"""The gateway process (`kanmon run`): the application that wires the layers below it
(`app`), the registry reconciler, the cluster node, the allocator and heap trimming, the
diagnostics endpoint and the process-level contract with the CLI (`gatewayprocess`)."""
