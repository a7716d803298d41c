# Test stand-in for postgres:17.6 (not reachable here): Debian's PostgreSQL on the local base,
# with the official image's interface: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB on first
# start, data in /var/lib/postgresql/data, password authentication over TCP, pg_isready.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/* /var/lib/postgresql/15/main /etc/postgresql/15/main
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
