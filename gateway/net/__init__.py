"""The network layer of the host: the WireGuard interface (`tunnel`), the nftables table
(`steering`, `limitsnft`), the devices' outer addresses (`underlay`) and the readers that turn
kernel events into log records (`firewalllog`, `firewalllog_reader`, `tunnellog`)."""
