#!/usr/bin/env bash
# Create the pixelmill realm in a running Keycloak through its admin REST API, for servers that
# were not started with `--import-realm`. Idempotent: every object is looked up before it is
# created, so running it twice changes nothing. Definitions come from realm-ImageProcessor.json
# next to this script, the same file `kc.sh start --import-realm` reads.
#
#   setup_keycloak.sh                    # realm, roles, the API's client: fit for production
#   setup_keycloak.sh --with-demo-users  # also demo-ImageProcessor.json: user/password, admin/admin,
#                                        # and password logins on the API's client (development)
#
# Environment: KEYCLOAK_URL (default http://localhost:8080), KEYCLOAK_ADMIN (default admin),
# KEYCLOAK_ADMIN_PASSWORD (required), KEYCLOAK_REALM (default: the realm file's name, the same
# definitions under another name). Needs curl and jq.
set -euo pipefail

KEYCLOAK_URL="${KEYCLOAK_URL:-http://localhost:8080}"
KEYCLOAK_URL="${KEYCLOAK_URL%/}"
KEYCLOAK_ADMIN="${KEYCLOAK_ADMIN:-admin}"
: "${KEYCLOAK_ADMIN_PASSWORD:?set KEYCLOAK_ADMIN_PASSWORD to the Keycloak admin password}"

for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "setup_keycloak: $tool is required" >&2; exit 1; }
done

WITH_DEMO_USERS=false
case "${1:-}" in
    "") ;;
    --with-demo-users) WITH_DEMO_USERS=true ;;
    *) echo "usage: setup_keycloak.sh [--with-demo-users]" >&2; exit 2 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REALM_FILE="${HERE}/realm-ImageProcessor.json"
DEMO_FILE="${HERE}/demo-ImageProcessor.json"
REALM="${KEYCLOAK_REALM:-$(jq -r '.realm' "$REALM_FILE")}"
CLIENT_ID="$(jq -r '.clients[0].clientId' "$REALM_FILE")"
RESPONSE_BODY="$(mktemp)"
trap 'rm -f "$RESPONSE_BODY"' EXIT
STATUS=""
FOUND_ID=""

log() { echo "setup_keycloak: $*" >&2; }

admin_token() {
    curl --silent --show-error --fail --max-time 10 \
        --data-urlencode "grant_type=password" \
        --data-urlencode "client_id=admin-cli" \
        --data-urlencode "username=${KEYCLOAK_ADMIN}" \
        --data-urlencode "password=${KEYCLOAK_ADMIN_PASSWORD}" \
        "${KEYCLOAK_URL}/realms/master/protocol/openid-connect/token" | jq -r '.access_token'
}

# api METHOD PATH [JSON_BODY]: call the admin API, leaving the HTTP status in $STATUS and the
# body in $RESPONSE_BODY. Statuses other than 2xx and 404 abort the script.
api() {
    local method="$1" path="$2" body="${3:-}"
    local args=(--silent --show-error --max-time 15 --output "$RESPONSE_BODY"
        --write-out '%{http_code}' --request "$method"
        --header "Authorization: Bearer ${TOKEN}" --header "Accept: application/json")
    if [[ -n "$body" ]]; then
        args+=(--header "Content-Type: application/json" --data-binary "$body")
    fi
    STATUS="$(curl "${args[@]}" "${KEYCLOAK_URL}/admin/realms${path}")"
    case "$STATUS" in
        2?? | 404) ;;
        *)
            log "$method $path answered $STATUS: $(head -c 500 "$RESPONSE_BODY")"
            exit 1
            ;;
    esac
}

ensure_realm() {
    api GET "/${REALM}"
    if [[ "$STATUS" == 404 ]]; then
        log "creating realm ${REALM}"
        api POST "" "$(jq -c --arg realm "$REALM" 'del(.clients, .roles, .components)
            | .realm = $realm' "$REALM_FILE")"
    else
        log "realm ${REALM} exists"
    fi
}

ensure_user_profile() {
    local wanted current missing
    wanted="$(jq -c '.components["org.keycloak.userprofile.UserProfileProvider"][0]
        .config["kc.user.profile.config"][0] | fromjson' "$REALM_FILE")"
    api GET "/${REALM}/users/profile"
    if [[ "$STATUS" == 404 ]]; then
        log "this Keycloak has no declarative user profile; demo_only stays a plain attribute"
        return
    fi
    current="$(cat "$RESPONSE_BODY")"
    missing="$(jq -c --argjson current "$current" \
        '[.attributes[] | select(.name as $n | ($current.attributes | map(.name) | index($n)) | not)]' \
        <<<"$wanted")"
    if [[ "$missing" == "[]" ]]; then
        log "user profile declares every attribute"
        return
    fi
    log "adding user profile attributes: $(jq -r 'map(.name) | join(", ")' <<<"$missing")"
    api PUT "/${REALM}/users/profile" \
        "$(jq -c --argjson missing "$missing" '.attributes += $missing' <<<"$current")"
}

ensure_roles() {
    local role name
    while IFS= read -r role; do
        name="$(jq -r '.name' <<<"$role")"
        api GET "/${REALM}/roles/${name}"
        if [[ "$STATUS" == 404 ]]; then
            log "creating realm role ${name}"
            api POST "/${REALM}/roles" "$role"
        fi
    done < <(jq -c '.roles.realm[]' "$REALM_FILE")
}

# client_uuid and user_uuid leave Keycloak's internal id (or nothing) in $FOUND_ID.
client_uuid() {
    api GET "/${REALM}/clients?clientId=${CLIENT_ID}"
    FOUND_ID="$(jq -r '.[0].id // empty' "$RESPONSE_BODY")"
}

ensure_client() {
    local client id mapper name
    client="$(jq -c --arg id "$CLIENT_ID" '.clients[] | select(.clientId == $id)' "$REALM_FILE")"
    client_uuid
    if [[ -z "$FOUND_ID" ]]; then
        log "creating client ${CLIENT_ID}"
        api POST "/${REALM}/clients" "$client"
        client_uuid
    else
        # Brings the flows of an existing client in line: earlier set-ups allowed password logins.
        log "updating client ${CLIENT_ID}"
        api PUT "/${REALM}/clients/${FOUND_ID}" "$(jq -c 'del(.protocolMappers)' <<<"$client")"
    fi
    id="$FOUND_ID"
    while IFS= read -r mapper; do
        name="$(jq -r '.name' <<<"$mapper")"
        api GET "/${REALM}/clients/${id}/protocol-mappers/models"
        if ! jq -e --arg name "$name" 'any(.[]; .name == $name)' "$RESPONSE_BODY" >/dev/null; then
            log "adding protocol mapper ${name} to ${CLIENT_ID}"
            api POST "/${REALM}/clients/${id}/protocol-mappers/models" "$mapper"
        fi
    done < <(jq -c '.protocolMappers[]' <<<"$client")
}

# Keycloak's partial import skips users that already exist. Password logins on the API's client
# are for the demo users only: the realm file (production) keeps them off.
ensure_demo_users() {
    log "importing demo users, allowing password logins on ${CLIENT_ID} (development only)"
    api POST "/${REALM}/partialImport" "$(jq -c '.ifResourceExists = "SKIP"' "$DEMO_FILE")"
    client_uuid
    api PUT "/${REALM}/clients/${FOUND_ID}" '{"directAccessGrantsEnabled": true}'
}

TOKEN="$(admin_token)"
ensure_realm
ensure_user_profile
ensure_roles
ensure_client
if [[ "$WITH_DEMO_USERS" == true ]]; then
    ensure_demo_users
fi
log "realm ${REALM} ready at ${KEYCLOAK_URL}/realms/${REALM}"
