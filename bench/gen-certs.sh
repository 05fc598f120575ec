#!/usr/bin/env bash
# Generate a throw-away test PKI for the sidecar-pair cases into DIR
# (copy of the recipe in shared/bench-reference/gen-certs.sh):
#   DIR/ca.crt|key         test root CA (ECDSA P-256, self-signed)
#   DIR/client.crt|key     workload cert, URI SAN spiffe://cluster.local/ns/default/sa/client
#   DIR/server.crt|key     workload cert, URI SAN spiffe://cluster.local/ns/default/sa/server
# Usage: bench/gen-certs.sh DIR
# Idempotent: does nothing if all files exist, unless FORCE=1.
set -euo pipefail
D="${1:?usage: gen-certs.sh DIR}"
mkdir -p "$D"
cd "$D"

if [[ "${FORCE:-0}" != 1 && -s ca.crt && -s client.crt && -s client.key && -s server.crt && -s server.key ]]; then
  echo "certs already present in $D (FORCE=1 to regenerate)"
  exit 0
fi

TD="spiffe://cluster.local"

# Root CA
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days 3650 \
  -subj "/O=txmesh-bench/CN=txmesh bench test root CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out ca.crt

# Workload certs (Istio-style: SPIFFE URI SAN only, both EKUs, empty-ish subject)
for sa in client server; do
  openssl ecparam -name prime256v1 -genkey -noout -out "$sa.key.ec"
  # PKCS#8 key (what istio-agent writes too); Envoy/BoringSSL accepts both.
  openssl pkcs8 -topk8 -nocrypt -in "$sa.key.ec" -out "$sa.key"
  rm -f "$sa.key.ec"
  openssl req -new -key "$sa.key" -subj "/O=cluster.local" -out "$sa.csr"
  cat > "$sa.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=critical,URI:${TD}/ns/default/sa/${sa}
authorityKeyIdentifier=keyid
EXT
  openssl x509 -req -in "$sa.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -sha256 -days 3650 -extfile "$sa.ext" -out "$sa.crt"
  rm -f "$sa.csr" "$sa.ext"
done
rm -f ca.srl
chmod 600 ./*.key

openssl verify -CAfile ca.crt client.crt server.crt
for sa in client server; do
  openssl x509 -in "$sa.crt" -noout -ext subjectAltName | tail -1
done
