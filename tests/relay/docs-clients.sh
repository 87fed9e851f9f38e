#!/usr/bin/env bash
# Installs the clients of the consumer examples in docs/consumers.md, for tests/relay/docs.rs:
# pika from PyPI into a virtual environment and amqplib from npm into a prefix, both pinned,
# under target/docs-clients (or the directory given). Reinstalls only when a pin, Python or
# Node changed; after that it needs no network.
#
# Usage: tests/relay/docs-clients.sh [DIR]
#
# Needs python3 with the venv module, node and npm (Debian: apt-get install python3-venv
# nodejs npm).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DIR=${1:-target/docs-clients}
PIKA="pika==1.4.4"
AMQPLIB="amqplib@2.3.1"

for program in python3 node npm; do
  if ! command -v "$program" >/dev/null 2>&1; then
    echo "error: $program not found; the docs test runs the Python and Node.js consumers of" \
      "docs/consumers.md (Debian: apt-get install python3-venv nodejs npm)" >&2
    exit 1
  fi
done

stamp="$(python3 --version 2>&1) node $(node --version) $PIKA $AMQPLIB"
if [[ -f $DIR/.installed && "$(cat "$DIR/.installed")" == "$stamp" ]]; then
  exit 0
fi
echo "installing $PIKA and $AMQPLIB into $DIR"
mkdir -p "$DIR"
if ! python3 -m venv --clear "$DIR/venv"; then
  echo "error: cannot create a virtual environment (Debian: apt-get install python3-venv)" >&2
  exit 1
fi
"$DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$PIKA"
npm install --silent --no-audit --no-fund --prefix "$DIR/node" "$AMQPLIB"
printf '%s' "$stamp" >"$DIR/.installed"
