"""A real SMTP server for chatd's notification tests (Debian: python3-aiosmtpd).

Listens on 127.0.0.1 on a free port, prints "READY <port>" on stdout, and
stores every message it accepts as <dir>/<n>.json: the envelope (mail_from,
rcpt_tos), the headers the tests look at, the decoded text and HTML parts,
and the raw message. Written to a temporary name and renamed, so a reader
never sees half a file. Runs until killed.

    python3 smtp_sink.py DIR
"""

import asyncio
import email
import email.policy
import json
import os
import sys

from aiosmtpd.smtp import SMTP


class Store:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        text = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "from": str(msg["From"]),
            "to": str(msg["To"]),
            "subject": str(msg["Subject"]),
            "content_type": msg.get_content_type(),
            "text": text.get_content() if text is not None else None,
            "html": html.get_content() if html is not None else None,
            "raw": envelope.content.decode("utf-8", errors="replace"),
        }
        final = os.path.join(self.directory, f"{self.count:04d}.json")
        tmp = final + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.rename(tmp, final)
        return "250 Message accepted for delivery"


async def main(directory):
    store = Store(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(store, hostname="sink.test"), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
