# Sourced by the results scripts (calibration, active learning, tasks): sets
# `data` (TUNEFUSE_DATA, default ../shared/data), `out` (OUT, default the
# caller's `default_out`), `bin` (TUNEFUSE_BIN, else the release build, built
# here) and `model` (MODEL, else scripts/fetch-model.sh), and creates $out.
data=${TUNEFUSE_DATA:-../shared/data}
out=${OUT:-$default_out}
if [ -z "${TUNEFUSE_BIN:-}" ]; then
  cargo build --release --quiet
  bin=${CARGO_TARGET_DIR:-target}/release/tunefuse
else
  bin=$TUNEFUSE_BIN
fi
model=${MODEL:-$(scripts/fetch-model.sh)}
mkdir -p "$out"
