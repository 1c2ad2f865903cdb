#!/usr/bin/env bash
# Development only (compose's `dev` profile, `make up KEYCLOAK=1`): adds the demo users user/password
# and admin/admin from demo-ImageProcessor.json to the realm, and lets the API's client
# api-gateway-client take password logins, so the README's token request works as it stands.
# The realm file itself keeps password logins off: production never gets them. Keycloak's partial
# import skips users that exist and the client update sets one flag, so running it twice changes
# nothing. Talks to the admin REST API through kcadm.sh (the Keycloak image's, unless KCADM says).
set -euo pipefail

: "${KEYCLOAK_ADMIN_PASSWORD:?set KEYCLOAK_ADMIN_PASSWORD to the Keycloak admin password}"
KEYCLOAK_URL="${KEYCLOAK_URL:-http://keycloak:8080}"
DEMO_FILE="${DEMO_FILE:-/opt/pixelmill/demo-ImageProcessor.json}"
REALM=ImageProcessor
CLIENT_ID=api-gateway-client
CONFIG_FILE="$(mktemp)"
trap 'rm -f "$CONFIG_FILE"' EXIT
kcadm() { "${KCADM:-/opt/keycloak/bin/kcadm.sh}" "$@" --config "$CONFIG_FILE"; }

kcadm config credentials --server "$KEYCLOAK_URL" --realm master \
    --user "${KEYCLOAK_ADMIN:-admin}" --password "$KEYCLOAK_ADMIN_PASSWORD"
kcadm create partialImport -r "$REALM" -f "$DEMO_FILE" >/dev/null
client="$(kcadm get clients -r "$REALM" -q clientId="$CLIENT_ID" --fields id --format csv --noquotes)"
kcadm update "clients/${client}" -r "$REALM" -s directAccessGrantsEnabled=true
echo "demo_users: demo users present and password logins on ${CLIENT_ID} in realm ${REALM}" >&2
