"""Surgically redeploy one unit: re-render it, restart only it, verify (roll back on failure).

pyinfra inventories/fleet.py deploys/redeploy_unit.py --limit box4090.lan --data unit=gemma4
pyinfra inventories/fleet.py deploys/redeploy_unit.py --data unit=whisper-server.service
"""

from pyinfra import host

from gemma4_fleet.deploys import redeploy_unit

redeploy_unit(str(host.data.get("unit", "")))
