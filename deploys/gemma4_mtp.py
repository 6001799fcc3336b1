"""Deploy llama-server with Gemma 4 + its MTP drafter to every host of an inventory.

pyinfra inventories/fleet.py deploys/gemma4_mtp.py
"""

from gemma4_fleet.deploys import gemma4_mtp

gemma4_mtp()
