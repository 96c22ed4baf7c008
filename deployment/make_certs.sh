#!/usr/bin/env bash
# Make a CA and a SuperLink server certificate for TLS between Flower's processes.
#
#   deployment/make_certs.sh OUTDIR HOST [HOST...]
#
# OUTDIR/ca.key, OUTDIR/ca.crt: the certificate authority (kept and reused if both exist, so
#   certificates already handed out stay valid). ca.crt goes to every SuperNode and workstation.
# OUTDIR/server.key, OUTDIR/server.pem: the SuperLink's key and certificate, signed by the CA,
#   valid 365 days for every HOST given (IPv4/IPv6 literals become IP:, names DNS:).
set -euo pipefail

usage() {
    echo "usage: $0 OUTDIR HOST [HOST...]" >&2
    echo "  makes OUTDIR/ca.{key,crt} (reused if present) and OUTDIR/server.{key,pem}" >&2
    echo "  for the SuperLink, valid for every HOST (DNS name, IPv4 or IPv6 address)" >&2
    echo "  e.g. $0 certs superlink.example.org 192.0.2.10 127.0.0.1" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
case "$1" in -h | --help) usage ;; esac
command -v openssl >/dev/null || { echo "$0: openssl not found" >&2; exit 1; }

out=$1
shift
sans=()
for host in "$@"; do
    [[ -n $host ]] || { echo "$0: empty HOST" >&2; exit 2; }
    if [[ $host =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || $host == *:* ]]; then
        host=${host#[}  # [::1] -> ::1
        sans+=("IP:${host%]}")
    else
        sans+=("DNS:$host")
    fi
done
san=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ -s $out/ca.key && -s $out/ca.crt ]]; then
    ca_note="reused"
else
    openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 \
        -subj "/CN=MH-pFedHN Flower CA" -out "$out/ca.crt" \
        -addext "basicConstraints = critical, CA:TRUE" \
        -addext "keyUsage = critical, keyCertSign, cRLSign" \
        -addext "subjectKeyIdentifier = hash"
    ca_note="new"
fi

openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=$1" -out "$tmp/server.csr"
cat >"$tmp/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $san
EOF
openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -CAserial "$tmp/ca.srl" -days 365 -sha256 \
    -extfile "$tmp/server.ext" -out "$out/server.pem" 2>/dev/null
chmod 600 "$out/ca.key" "$out/server.key"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null

cat <<EOF
wrote to $out/ (server certificate for $san):
  ca.key      ($ca_note) CA private key: keep it here, never copy it; signs new server certificates
  ca.crt      ($ca_note) CA certificate: SuperNodes --root-certificates, ServerApp SuperExec --root-certificates, flwr config.toml root-certificates
  server.key  SuperLink private key: flower-superlink --ssl-keyfile (SuperLink host only)
  server.pem  SuperLink certificate, 365 days: flower-superlink --ssl-certfile (with --ssl-ca-certfile ca.crt)
EOF
