"""A small real systemd service: proves the fleet takes a pyinfra deploy over SSH, idempotently."""

from io import StringIO

from pyinfra.operations import files, systemd

UNIT = """[Unit]
Description=gemma4-fleet harness check service

[Service]
ExecStart=/usr/bin/python3 -m http.server 9090 --bind 0.0.0.0 --directory /srv/hello
DynamicUser=yes

[Install]
WantedBy=multi-user.target
"""

files.directory(name="Content", path="/srv/hello", mode="755")
files.put(name="Page", src=StringIO("hello from the fleet\n"), dest="/srv/hello/index.html")
unit = files.put(name="Unit", src=StringIO(UNIT), dest="/etc/systemd/system/hello.service")
systemd.daemon_reload(name="daemon-reload", _if=unit.did_change)
systemd.service(name="hello running", service="hello.service", running=True, enabled=True)
