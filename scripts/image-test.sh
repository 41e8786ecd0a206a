#!/usr/bin/env bash
# Smoke test of the server image (what `make image-test` runs):
#   1. builds it (scripts/build-image.sh; SKIP_BUILD=1 tests the existing $IMAGE);
#   2. runs it the way a hardened cluster does: read-only root file system, a tmpfs at /tmp,
#      published on 127.0.0.1 only;
#   3. checks the user (10001), that the image holds no PyTorch and no compiler, and the
#      image's own HEALTHCHECK;
#   4. HTTP checks (scripts/image_smoke.py): /ready, a streamed generation, encode, classify;
#   5. the SIGTERM drain: many long streams, SIGTERM while they run; /ready and new work get
#      503, every stream ends with its final event, the container exits with code 0;
#   6. reports what the server wrote to /tmp (expected: nothing) and the image size.
# Every wait is bounded; the container is removed on exit, whatever happened.
#
# Environment: IMAGE, CONTAINER_ENGINE, BASE_IMAGE (scripts/common.sh), SKIP_BUILD=1.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"

NAME="seq2serve-image-test-$$"
# A port no other process holds: other test servers may run on this machine.
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"

cleanup() {
    # The test is over: no drain wanted (podman's --time 0; docker rm --force kills at once).
    local stop_now=()
    if [[ "$CONTAINER_ENGINE" == podman ]]; then
        stop_now=(--time 0)
    fi
    timeout 60 "$CONTAINER_ENGINE" rm --force "${stop_now[@]}" "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    "$ROOT/scripts/build-image.sh"
fi

run_args=(--detach --name "$NAME" --read-only --tmpfs /tmp:rw,size=64m,mode=1777
    --publish "127.0.0.1:$PORT:8000")
if [[ "$CONTAINER_ENGINE" == docker ]]; then
    # docker runs HEALTHCHECK itself; a short interval lets this test see its verdict.
    run_args+=(--health-interval 2s --health-start-period 0s)
fi
echo "== run $IMAGE on 127.0.0.1:$PORT (read-only root, tmpfs /tmp)"
# podman reports that it cannot schedule HEALTHCHECK without systemd (checked below by hand);
# that report is left out, anything else it says is shown.
timeout 120 "$CONTAINER_ENGINE" run "${run_args[@]}" "$IMAGE" 2>&1 >/dev/null \
    | { grep -v 'unable to get systemd connection' || true; } >&2

logs_on_failure() {
    echo "== container logs (last 40 lines)" >&2
    timeout 30 "$CONTAINER_ENGINE" logs --tail 40 "$NAME" >&2 || true
}
trap 'logs_on_failure; cleanup' ERR

echo "== HTTP checks"
python3 "$ROOT/scripts/image_smoke.py" --url "http://127.0.0.1:$PORT"

echo "== image contents"
uid="$(timeout 30 "$CONTAINER_ENGINE" exec "$NAME" id -u)"
[[ "$uid" == 10001 ]] || { echo "FAILED: runs as uid $uid, expected 10001" >&2; exit 1; }
timeout 30 "$CONTAINER_ENGINE" exec "$NAME" python -c \
    'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is not None)' \
    || { echo "FAILED: PyTorch is installed in the image" >&2; exit 1; }
if timeout 30 "$CONTAINER_ENGINE" exec "$NAME" sh -c 'command -v gcc cc c++ >/dev/null'; then
    echo "FAILED: a compiler is installed in the runtime image" >&2
    exit 1
fi
echo "uid $uid; no torch; no compiler"

if [[ "$CONTAINER_ENGINE" == podman ]]; then
    # podman schedules HEALTHCHECK through systemd timers, absent in CI containers: run it now.
    timeout 60 podman healthcheck run "$NAME" >/dev/null
    echo "HEALTHCHECK: healthy"
else
    deadline=$((SECONDS + 60))
    until [[ "$(docker inspect --format '{{.State.Health.Status}}' "$NAME")" == healthy ]]; do
        ((SECONDS < deadline)) || { echo "FAILED: HEALTHCHECK not healthy in 60 s" >&2; exit 1; }
        sleep 1
    done
    echo "HEALTHCHECK: healthy"
fi

written="$(timeout 30 "$CONTAINER_ENGINE" exec "$NAME" sh -c 'ls -A /tmp')"
echo "written to /tmp while serving: ${written:-nothing}"

echo "== SIGTERM drain"
python3 "$ROOT/scripts/image_smoke.py" --url "http://127.0.0.1:$PORT" \
    --drain "$CONTAINER_ENGINE" "$NAME"
echo "server log during the drain:"
timeout 30 "$CONTAINER_ENGINE" logs "$NAME" 2>&1 \
    | grep -E ': draining|drained:|drain timeout|Finished server process' \
    || true
trap cleanup ERR

size_bytes="$(engine image inspect --format '{{.Size}}' "$IMAGE")"
echo "== image $IMAGE: $((size_bytes / 1000000)) MB (goal for the CPU image: <= 400 MB)"
echo "image test passed in ${SECONDS} s"
