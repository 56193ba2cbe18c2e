"""Echo server on Python's `websockets`, a third-party peer for tests/ws.rs.

Binds 127.0.0.1:0, prints the port on stdout, then echoes every message.
It also pings each client every 20 ms and counts the pongs; a text message
"stats" is answered with {"pongs": N} instead of an echo. A binary frame
holding zlib data (smolkit's compression) is echoed as it came.
"""

import asyncio
import json
import sys

import websockets


async def handler(ws):
    pongs = 0

    async def pinger():
        nonlocal pongs
        while True:
            await asyncio.sleep(0.02)
            waiter = await ws.ping()
            await asyncio.wait_for(waiter, 5)
            pongs += 1

    task = asyncio.create_task(pinger())
    try:
        async for message in ws:
            if message == "stats":
                await ws.send(json.dumps({"pongs": pongs}))
            else:
                await ws.send(message)
    except websockets.ConnectionClosed:
        pass
    finally:
        task.cancel()


async def main():
    async with websockets.serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
