"""A RIS's HL7 v2 interface for the delivery tests (no RIS runs here): a real MLLP server on loopback, the ``hl7``
library's asyncio one (:func:`hl7.mllp.start_hl7_server`), that parses each message it gets with :func:`hl7.parse`
and answers the ACK the library builds for it (:meth:`hl7.Message.create_ack`), as an interface engine does.

``answers`` are what it answers first, one a message, then ``AA``: ``AE`` (ERR-3 204, unknown key), ``AR`` (ERR-3
207, an internal error: the RIS's database down), ``AR200`` (a reject, ERR-3 200: it takes no such message type),
each with MSA-3 and ERR-8 texts naming the patient, as a RIS's may; ``crlf`` (an AA whose segments end in CR LF), ``wrong`` (an AA whose MSA-2 names another message), ``silent`` (no answer, the connection
kept open), ``close`` (the connection closed without an answer), ``reset`` (closed with a TCP reset), ``garbage`` (an MLLP block that is no HL7).
With ``ssl`` (a server context) it speaks MLLP over TLS. Runs in the test's event loop: start it with
:meth:`start`, inside ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import hl7
from hl7.mllp import start_hl7_server

ERR_TEXT = "Patient DOE JANE MRN 4711 not registered"
"""MSA-3 and ERR-8 of its AE and AR answers: a RIS's words may name the patient; ctscreen must not repeat them."""

ERR_CODES = {"AE": "204^Unknown key identifier", "AR": "207^Application internal error",
             "AR200": "200^Unsupported message type"}


class MllpReceiver:
    """An MLLP server at ``127.0.0.1:port``; ``messages`` holds what it received (parsed), ``raw`` the bytes of
    each, ``filed`` those it accepted (AA)."""

    def __init__(self, port: int = 0, ssl: Any = None) -> None:
        self.port = port
        self.ssl = ssl
        """The server's :class:`ssl.SSLContext` (None: plain TCP)."""
        self.answers: list[str] = []
        self.messages: list[hl7.Message] = []
        self.raw: list[bytes] = []
        self.filed: list[hl7.Message] = []
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> MllpReceiver:
        self._server = await start_hl7_server(self._client, "127.0.0.1", self.port, encoding="utf-8", ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader, writer) -> None:  # noqa: ANN001 - the library's HL7 streams
        self.connections += 1
        try:
            while True:
                try:
                    block = await reader.readblock()
                except asyncio.IncompleteReadError:  # the sender closed its connection
                    return
                self.raw.append(block)
                message = hl7.parse(block.decode("utf-8"))
                self.messages.append(message)
                answer = self.answers.pop(0) if self.answers else "AA"
                if answer == "silent":
                    await reader.read()  # until the sender gives up and closes
                    return
                if answer == "close":
                    return
                if answer == "reset":  # SO_LINGER 0: the close sends a RST
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if answer == "garbage":
                    writer.writeblock(b"this is no HL7 acknowledgment")
                    await writer.drain()
                    continue
                code = answer[:2] if answer in ERR_CODES else "AA" if answer in ("wrong", "crlf") else answer
                ack = message.create_ack(code, application="RIS", facility="HOSP")
                if answer == "wrong":
                    ack.segment("MSA").assign_field("SOME-OTHER-ID", 2)
                text = str(ack)
                if answer in ERR_CODES:
                    ack.segment("MSA").assign_field(ack.escape(ERR_TEXT), 3)
                    text = str(ack) + f"ERR||PID^1^3|{ERR_CODES[answer]}^HL70357|E||||{ack.escape(ERR_TEXT)}\r"
                if answer == "crlf":
                    text = text.replace("\r", "\r\n")
                if code == "AA" and answer != "wrong":
                    self.filed.append(message)
                writer.writeblock(text.encode("utf-8"))
                await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
