"""A ComfyUI API client pointed at comfyq, in the style of ComfyUI's own
script_examples/websockets_api_example.py: queue a prompt, read /ws until the
prompt's `executing` with `node: null`, then fetch /history and /view.

    python3 deploy/examples/comfyui_client.py 127.0.0.1:8080 [<api-key>]

Nothing in it knows about comfyq but the API key (sent as a bearer token
over HTTP and as `?token=` on the WebSocket). Standard library only: the
WebSocket client below is the few lines of RFC 6455 a client needs, so the
example runs without `websocket-client`.
"""

import base64
import json
import os
import socket
import struct
import sys
import urllib.parse
import urllib.request
import uuid

PROMPT = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage",
          "inputs": {"images": ["2", 0], "filename_prefix": "example/invert"}},
}


class WebSocket:
    """The client side of RFC 6455: handshake, masked text frames out,
    text/binary frames in (with continuations), pings answered."""

    def __init__(self, host, path):
        hostname, port = host.rsplit(":", 1)
        self.sock = socket.create_connection((hostname, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def _read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("socket closed")
            data += chunk
        return data

    def _send(self, opcode, payload):
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self):
        """The next message: str (text) or bytes (binary)."""
        message, kind = b"", None
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("closed by the server")
            if opcode in (0x1, 0x2):
                kind = opcode
            message += payload
            if first & 0x80:
                return message.decode() if kind == 0x1 else message


def main(host, api_key=None):
    client_id = str(uuid.uuid4())
    # No key: a development server's open mode (`comfyq up`).
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def http(path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{host}{path}", data=data, headers={
            **headers, **({"Content-Type": "application/json"} if data else {})})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    token = f"&token={urllib.parse.quote(api_key)}" if api_key else ""
    ws = WebSocket(host, f"/ws?clientId={client_id}{token}")
    queued = json.loads(http("/prompt", {"prompt": PROMPT, "client_id": client_id}))
    prompt_id = queued["prompt_id"]
    print("queued", prompt_id)
    while True:
        message = ws.recv()
        if isinstance(message, str):
            message = json.loads(message)
            print("ws", message["type"])
            data = message["data"]
            if message["type"] == "executing" and data["node"] is None \
                    and data["prompt_id"] == prompt_id:
                break  # execution is done
            if message["type"] == "execution_error":
                print("error", data.get("exception_message"))
                return 1
    history = json.loads(http(f"/history/{prompt_id}"))[prompt_id]
    for node_id, output in history["outputs"].items():
        for image in output.get("images", []):
            query = urllib.parse.urlencode({
                "filename": image["filename"], "subfolder": image["subfolder"],
                "type": image["type"]})
            data = http(f"/view?{query}")
            is_png = data.startswith(b"\x89PNG")
            print(f"image {node_id}: {image['filename']} {len(data)} bytes png={is_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
