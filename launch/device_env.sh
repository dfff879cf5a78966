# Sourced by the device scripts (device_multi.sh, device_fixed.sh, probe_a2a.sh): run from the
# repository root with the package importable; results go to a scratch $OUT that the caller
# packs into FINAL (the $OUT the device tool brings back); n = the GPUs on this machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FINAL=${OUT:-out}; mkdir -p "$FINAL"
export OUT=$(mktemp -d)  # the scripts write here; packed into $FINAL
n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
