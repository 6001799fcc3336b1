"""Programs shipped to the hosts and run there with the host's python3 (standard library only)."""
