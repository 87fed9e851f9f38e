#!/bin/sh
# certbot deploy hook: copies the certificate and key of hirehop-relay's host name, which
# certbot keeps root-only under /etc/letsencrypt, to a directory the relay's group can read.
# certbot runs it as root after every issuance and renewal, with RENEWED_LINEAGE naming the
# renewed lineage (/etc/letsencrypt/live/<name>).
#
#   install -m 0755 deploy/systemd/certbot-deploy-hook.sh \
#     /etc/letsencrypt/renewal-hooks/deploy/hirehop-relay
#
# Set these three to your host name, and the directory and group relay.toml's [tls] uses.
DOMAIN=hirehop-relay.example.com
DEST=/etc/hirehop-relay/tls
GROUP=hirehop-relay

set -eu

case "$RENEWED_LINEAGE" in
  */"$DOMAIN") ;;
  *) exit 0 ;; # another certificate of this machine
esac

install -d -m 0750 -o root -g "$GROUP" "$DEST"
# Each file lands by a rename, so the relay never reads one half-written. The key first: until
# the chain follows, the pair does not match, and the relay keeps using the pair it has.
for file in privkey.pem fullchain.pem; do
  install -m 0640 -o root -g "$GROUP" "$RENEWED_LINEAGE/$file" "$DEST/.$file.new"
  mv -f "$DEST/.$file.new" "$DEST/$file"
done
