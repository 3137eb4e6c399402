"""Verify a webhook with the reference Standard Webhooks library.

    python3 deploy/examples/verify_webhook.py <whsec_secret> <request.json>

`request.json` holds {"headers": {name: value}, "body": "<raw body>"}.
Prints the verified payload's type and exits 0, or exits 1 if it fails.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook


def main(secret: str, path: str) -> int:
    with open(path, encoding="utf-8") as f:
        request = json.load(f)
    payload = Webhook(secret).verify(request["body"], request["headers"])
    print(payload["type"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
