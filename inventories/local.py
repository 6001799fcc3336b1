"""The embedded default: the local fleet of nspawn test hosts (`gemma4-fleet fleet up 2`)."""

from gemma4_fleet.testfleet.inventory import local_fleet_hosts

local_fleet = local_fleet_hosts()
