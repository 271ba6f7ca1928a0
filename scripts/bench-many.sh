# The "many streams" workload of scripts/bench (sourced by it; uses its
# helpers: chain, start_anvil, new_db, now_ms, report, row, median, $work).
#
# 200 streams (BENCH_MANY_CONTRACTS contracts x Burned, Unlisted, Labeled, the
# last one left out) on one chain behind a request-counting proxy that also
# passes WebSockets through, 3 replicas with pool_size = 8 and otherwise
# default settings (push where offered: ws_urls derived from the HTTP URL).
#   backfill  BENCH_MANY_BLOCKS blocks of 15 transactions to random contracts:
#             start -> every cursor at the head; rows equal the chain
#   idle      BENCH_MANY_IDLE_S seconds with no new block: requests reaching
#             the node per second, transaction ids burned per second (the
#             cluster's next xid, read without taking one)
#   live      a block every 0.5 s with 5 transactions to random contracts:
#             last block -> every cursor at it; mined -> committed per block
#   sessions  the most sessions of the replicas seen at once, all along
#   readyz    every replica's /readyz, probed all along the live phase

MANY_CONTRACTS=${BENCH_MANY_CONTRACTS:-67}
MANY_BLOCKS=${BENCH_MANY_BLOCKS:-300}
MANY_IDLE_S=${BENCH_MANY_IDLE_S:-30}
MANY_LIVE_BLOCKS=${BENCH_MANY_LIVE_BLOCKS:-60}

# many_streams BINARY LABEL
many_streams() {
  local mbin=$1 label=$2 rpc port prpc addrs head onchain db cfg streams
  streams=$(( MANY_CONTRACTS * 3 - 1 ))
  log "many ($label): $streams streams, 3 replicas, pool_size 8"
  rpc=$(start_anvil)
  port=$(free_port)
  node scripts/demo-chain.mjs count-proxy "$port" "$rpc" &
  LC_CLEANUP_PIDS+=($!)
  prpc="http://127.0.0.1:$port"
  for _ in $(seq 100); do chain head "$prpc" >/dev/null 2>&1 && break; sleep 0.1; done
  addrs="$work/many-$label.addrs"
  chain deploy-many "$rpc" "$MANY_CONTRACTS" >"$addrs"
  chain scatter "$rpc" "$addrs" "$MANY_BLOCKS" 15 7 0 >/dev/null
  head=$(chain head "$rpc")
  onchain=$(chain count-all "$rpc" "$addrs" "$head" "$streams")

  db=$(new_db many)
  cfg="$work/many-$label.toml"
  {
    printf '[database]\nurl = "%s"\npool_size = 8\n\n[telemetry]\nhttp_listen = "127.0.0.1:0"\n\n' "$db"
    printf '[defaults]\nchain_id = 31337\nrpc_urls = ["%s"]\nconfirmations = 0\nstart_block = 0\n' "$prpc"
    local i=0 a kind event
    while read -r a; do
      for kind in burned unlisted labeled; do
        [ "$i" -lt "$streams" ] || break
        case $kind in
          burned) event='event Burned(address indexed from, uint256 amount)' ;;
          unlisted) event='event Unlisted(uint256 value)' ;;
          labeled) event='event Labeled(string indexed label, bytes indexed blob, string text, uint8 small, int256 delta)' ;;
        esac
        printf '\n[[streams]]\nname = "s%03d_%s"\naddresses = ["%s"]\nevents = ["%s"]\n' "$i" "$kind" "$a" "$event"
        i=$((i + 1))
      done
    done <"$addrs"
  } >"$cfg"
  "$mbin" migrate --config "$cfg" --replica-id bench-migrate >/dev/null

  # The sessions of the replicas, sampled every 100 ms until the end.
  ( while :; do psql "$db" -qtAXc "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'many-%'" 2>/dev/null; sleep 0.1; done ) >"$work/many-$label.sessions" &
  local sampler=$!
  LC_CLEANUP_PIDS+=($sampler)

  local pids=() http=() t0 t1 r hp
  t0=$(now_ms)
  for r in 1 2 3; do
    hp=$(free_port); http+=("$hp")
    LOGCURSOR_HTTP_LISTEN="127.0.0.1:$hp" "$mbin" run --config "$cfg" --replica-id "many-$r" >"$work/many-$label-$r.log" 2>&1 &
    pids+=($!)
    LC_CLEANUP_PIDS+=($!)
  done
  many_wait_all "$db" "$head" "$streams"
  t1=$(now_ms)
  local stored; stored=$(psql "$db" -qtAXc "SELECT count(*) FROM events")

  # Idle: nothing is mined.
  sleep 2
  local c0 c1 x0 x1 ws
  read -r c0 _ < <(curl -s "$prpc/count")
  x0=$(psql "$db" -qtAXc "SELECT pg_snapshot_xmax(pg_current_snapshot())")
  sleep "$MANY_IDLE_S"
  read -r c1 ws < <(curl -s "$prpc/count")
  x1=$(psql "$db" -qtAXc "SELECT pg_snapshot_xmax(pg_current_snapshot())")

  # Live, with /readyz probed meanwhile.
  ( while :; do
      for hp in "${http[@]}"; do curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$hp/readyz"; done
      sleep 0.2
    done ) >"$work/many-$label.readyz" &
  local prober=$!
  LC_CLEANUP_PIDS+=($prober)
  chain scatter "$rpc" "$addrs" "$MANY_LIVE_BLOCKS" 5 11 500 >"$work/many-$label-mined.csv"
  local lhead last_mined caught
  lhead=$(chain head "$rpc")
  last_mined=$(tail -1 "$work/many-$label-mined.csv" | cut -d, -f2)
  many_wait_all "$db" "$lhead" "$streams"
  caught=$(( $(now_ms) - last_mined ))
  kill "$prober" 2>/dev/null || true
  local lstored lonchain
  lstored=$(psql "$db" -qtAXc "SELECT count(*) FROM events")
  lonchain=$(chain count-all "$rpc" "$addrs" "$lhead" "$streams")
  kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  kill "$sampler" 2>/dev/null || true

  local p50 p99 readyz_max readyz_p50 sessions
  read -r p50 p99 < <(psql "$db" -qtAX -F ' ' -v ON_ERROR_STOP=1 \
    -c "CREATE TEMP TABLE mined (block bigint, mined_ms bigint)" \
    -c "\\copy mined FROM '$work/many-$label-mined.csv' CSV HEADER" \
    -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY d)::numeric, 1), round(percentile_cont(0.99) WITHIN GROUP (ORDER BY d)::numeric, 1)
          FROM (SELECT extract(epoch FROM min(pg_xact_commit_timestamp(e.xmin))) * 1000 - m.mined_ms AS d
                  FROM events e JOIN mined m ON m.block = e.block_number GROUP BY m.block, m.mined_ms) t")
  readyz_max=$(awk 'BEGIN { m = 0 } { if ($1 > m) m = $1 } END { printf "%.1f", m * 1000 }' "$work/many-$label.readyz")
  readyz_p50=$(median $(awk '{ printf "%.1f\n", $1 * 1000 }' "$work/many-$label.readyz"))
  sessions=$(sort -n "$work/many-$label.sessions" | tail -1)

  report '\n%s\n' "many ($label: $mbin): $streams streams on $MANY_CONTRACTS contracts, 3 replicas, pool_size 8, defaults"
  report '%s\n' "$(row "backfill: start -> every cursor at block $head" "$((t1 - t0)) ms" "rows $stored, chain $onchain")"
  report '%s\n' "$(row "idle ${MANY_IDLE_S}s: requests to the node per second" "$(awk -v a="$c0" -v b="$c1" -v s="$MANY_IDLE_S" 'BEGIN { printf "%.1f", (b - a) / s }')" "target <= 20")"
  report '%s\n' "$(row "idle: transaction ids per second (cluster)" "$(awk -v a="$x0" -v b="$x1" -v s="$MANY_IDLE_S" 'BEGIN { printf "%.2f", (b - a) / s }')" "target <= 5")"
  report '%s\n' "$(row "sessions of the replicas, most at once" "$sessions" "target <= 24")"
  report '%s\n' "$(row "WebSocket connections opened (all replicas, all run)" "$ws")"
  report '%s\n' "$(row "live: last block -> every cursor at it" "$caught ms" "target <= 3000")"
  report '%s\n' "$(row "live: mined -> committed p50" "$p50 ms" "target <= 25")"
  report '%s\n' "$(row "live: mined -> committed p99" "$p99 ms")"
  report '%s\n' "$(row "live: rows equal the chain" "$lstored / $lonchain")"
  report '%s\n' "$(row "/readyz during live: p50 / max" "$readyz_p50 / $readyz_max ms" "target <= 100")"
}

# many_wait_all DB BLOCK STREAMS: until STREAMS cursors are at BLOCK or past it.
many_wait_all() {
  until [ "$(psql "$1" -qtAXc "SELECT count(*) FILTER (WHERE last_processed_block >= $2) FROM block_cursors" 2>/dev/null || echo 0)" -ge "$3" ]; do
    sleep 0.05
  done
}
