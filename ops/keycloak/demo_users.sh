#!/usr/bin/env bash
# Development profile only (`docker compose --profile dev up -d`): adds the demo users user/user
# and admin/admin and the password-login client pixelmill-dev-cli from demo-ImageProcessor.json to
# the realm. Keycloak's partial import skips what exists, so running it twice changes nothing.
# Runs in the Keycloak image, whose kcadm.sh talks to the admin REST API.
set -euo pipefail

: "${KEYCLOAK_ADMIN_PASSWORD:?set KEYCLOAK_ADMIN_PASSWORD to the Keycloak admin password}"
KEYCLOAK_URL="${KEYCLOAK_URL:-http://keycloak:8080}"
DEMO_FILE="${DEMO_FILE:-/opt/pixelmill/demo-ImageProcessor.json}"
KCADM=(/opt/keycloak/bin/kcadm.sh)
CONFIG=(--config /tmp/kcadm.config)

"${KCADM[@]}" config credentials "${CONFIG[@]}" --server "$KEYCLOAK_URL" --realm master \
    --user "${KEYCLOAK_ADMIN:-admin}" --password "$KEYCLOAK_ADMIN_PASSWORD"
"${KCADM[@]}" create partialImport "${CONFIG[@]}" -r ImageProcessor -f "$DEMO_FILE" -o
echo "demo_users: demo users and pixelmill-dev-cli present in realm ImageProcessor" >&2
