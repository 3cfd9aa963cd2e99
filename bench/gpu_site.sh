# Sourced by the bench/*_gpu.sh and gpu_run.sh scripts on a bare GPU machine: install every carried wheel of $WHEELS
# (default .gpu/whl) not yet in $site (a warm machine keeps /tmp/site, and wheels may arrive in later calls), put it
# on PYTHONPATH, and say what is still missing. Our own dependencies the GPU image lacks come from
# bench/gpu_wheels.sh, flashinfer's from shared/gpu/wheels.sh.
site=${site:-/tmp/site}
WHEELS=${WHEELS:-.gpu/whl}
for whl in "$WHEELS"/*.whl; do
  [ -f "$whl" ] || continue
  dist=$(basename "$whl" | cut -d- -f1)
  ls -d "$site/$dist"-*.dist-info >/dev/null 2>&1 && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$whl" || exit 1
done
export PYTHONPATH="$site:$PWD"
missing=$(python3 -c "import importlib.util as u; print(' '.join(m for m in 'pydantic gguf orjson llguidance flashinfer triton'.split() if u.find_spec(m) is None))")
[ -z "$missing" ] || echo "missing on this machine: $missing (bash bench/gpu_wheels.sh .gpu/whl here, then carry .gpu/whl)"
echo "git commit ${KUBELLM_GIT_COMMIT:-unknown: set KUBELLM_GIT_COMMIT=\$(git rev-parse HEAD) in the command, the copied .git is stale}"
