"""The ckptd service: an asyncio (uvloop) daemon that snapshots registered processes on
a schedule and answers a JSON control protocol on a unix socket. Only this package
imports asyncio; everything it drives (engine, store) is synchronous."""
