-- Keycloak's own database beside pixelmill's, on the compose PostgreSQL (run once, by the image's
-- entrypoint, when the data volume is empty).
CREATE DATABASE keycloak OWNER pixelmill;
