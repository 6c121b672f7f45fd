"""Control plane between the gateway and the role workers: signed JSON/msgpack messages over HTTP.

Torch-free: the gateway imports this package.
"""
