"""The gateway for a stock mitmdump: `mitmdump -s addons/mitmdump_script.py ...`, with cohere-gateway
installed in mitmdump's environment (docs/gateway.md). mitmproxy executes a script file without
registering it as a module, and the gateway's dataclasses need their module registered: so the addon is
imported here by its package name rather than its own file being loaded by path."""

from cohere_gateway.addons.gateway import Gateway

addons = [Gateway()]
