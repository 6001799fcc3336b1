"""The embedded default: the local fleet of nspawn test hosts (`gemma4-fleet fleet up 2`)."""

from gemma4_fleet.testfleet.inventory import local_fleet_hosts, release_group

local_fleet = local_fleet_hosts()
# One group per Debian release, so `--limit trixie` picks those hosts of a mixed fleet.
bookworm = release_group("bookworm")
trixie = release_group("trixie")
