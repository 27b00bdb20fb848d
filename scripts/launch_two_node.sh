#!/usr/bin/env bash
# Run mlxkt on two Macs (or two local ranks) in one line.
#
#   scripts/launch_two_node.sh --hosts mac1.local,mac2.local --model ~/models/r1-4bit \
#       [--mode experts|pipeline] [--backend ring|jaccl] [--ips 10.0.5.1,10.0.5.2] \
#       [--python /path/to/python] [--hostfile mlxkt-hosts.json] [--timeout 120] \
#       -- generate --prompt "Why is the sky blue?"        (or: chat ..., serve --port 8080 ...)
#
# Without --hosts it starts two local ranks on this machine (a dry run of the whole path).
# Checks, on every host: SSH without a password, the same Python with mlx and mlxkt, the
# same MLX version, the model directory (same config.json and weight index as here), and
# for the ring backend the Thunderbolt bridge IP (ipconfig getifaddr bridge0). Then writes
# the hostfile and starts both ranks with `mlxkt launch`. See docs/two-node.md.
set -euo pipefail

hosts="" model="" mode="experts" backend="ring" ips="" python="" hostfile="mlxkt-hosts.json" timeout=""
die() { echo "launch_two_node: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) hosts="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --mode) mode="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --ips) ips="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command to run goes after --)" ;;
  esac
done
[[ -n "$model" ]] || die "--model is required (the same converted directory on both Macs)"
[[ $# -gt 0 ]] || die "nothing to run: add -- generate|chat|serve ..."
[[ "$mode" == experts || "$mode" == pipeline ]] || die "--mode must be experts or pipeline"
[[ "$backend" == ring || "$backend" == jaccl ]] || die "--backend must be ring or jaccl"
python="${python:-$(command -v python3)}"
sub="$1"; shift
case "$sub" in
  serve) cmd=(serve "$model" "$@") ;;
  generate|chat) cmd=("$sub" --model "$model" "$@") ;;
  *) die "the command must be generate, chat or serve, not $sub" ;;
esac

check_python='import mlx.core as mx, mlxkt; print(mx.__version__)'
fingerprint() {  # what must match on both hosts: config and weight index
  echo "cd $(printf %q "$model") && test -f config.json && cat config.json model.safetensors.index.json 2>/dev/null | cksum"
}
extra=()
[[ -n "$timeout" ]] && extra+=(--timeout "$timeout")

if [[ -z "$hosts" ]]; then  # two local ranks
  local_mlx=$("$python" -c "$check_python") || die "$python cannot import mlx and mlxkt"
  bash -c "$(fingerprint)" >/dev/null || die "no model at $model (config.json missing)"
  echo "launch_two_node: two local ranks, MLX $local_mlx, mode $mode" >&2
  exec "$python" -m mlxkt.distributed.cli -n 2 --distributed "$mode" --python "$python" ${extra[@]+"${extra[@]}"} -- "${cmd[@]}"
fi

IFS=, read -r -a host_list <<< "$hosts"
[[ ${#host_list[@]} -eq 2 ]] || die "--hosts takes two hosts, e.g. mac1.local,mac2.local"
IFS=, read -r -a ip_list <<< "${ips:-}"
want_mlx="" want_model=""
for i in 0 1; do
  h="${host_list[$i]}"
  ssh -o BatchMode=yes -o ConnectTimeout=5 "$h" true 2>/dev/null \
    || die "cannot ssh to $h without a password: run ssh-copy-id $h (and enable Remote Login on it)"
  v=$(ssh -o BatchMode=yes "$h" "$(printf %q "$python") -c $(printf %q "$check_python")" 2>/dev/null) \
    || die "$h: $python cannot import mlx and mlxkt (install mlxkt at the same path on both Macs)"
  m=$(ssh -o BatchMode=yes "$h" "$(fingerprint)" 2>/dev/null) \
    || die "$h: no model at $model (copy it to the same path on both Macs)"
  [[ -z "$want_mlx" || "$v" == "$want_mlx" ]] || die "MLX $want_mlx on ${host_list[0]} but $v on $h"
  [[ -z "$want_model" || "$m" == "$want_model" ]] || die "$model differs between ${host_list[0]} and $h"
  want_mlx="$v" want_model="$m"
  if [[ "$backend" == ring && -z "${ip_list[$i]:-}" ]]; then
    ip_list[$i]=$(ssh -o BatchMode=yes "$h" ipconfig getifaddr bridge0 2>/dev/null || true)
    [[ -n "${ip_list[$i]}" ]] || die "$h has no Thunderbolt bridge IP (bridge0); connect the Thunderbolt cable and enable Thunderbolt Bridge (docs/two-node.md), or pass --ips"
  fi
  echo "launch_two_node: $h ok (MLX $v${ip_list[$i]:+, ip ${ip_list[$i]}})" >&2
done

if [[ "$backend" == jaccl ]]; then
  "$(dirname "$python")/mlx.distributed_config" --hosts "$hosts" --over thunderbolt --backend jaccl \
    --output-hostfile "$hostfile" || die "mlx.distributed_config could not set up RDMA over Thunderbolt"
else
  printf '{"backend": "ring", "hosts": [{"ssh": "%s", "ips": ["%s"]}, {"ssh": "%s", "ips": ["%s"]}]}\n' \
    "${host_list[0]}" "${ip_list[0]}" "${host_list[1]}" "${ip_list[1]}" > "$hostfile"
fi
echo "launch_two_node: wrote $hostfile; starting rank 0 on ${host_list[0]}, rank 1 on ${host_list[1]}" >&2
exec "$python" -m mlxkt.distributed.cli --hostfile "$hostfile" --backend "$backend" --distributed "$mode" \
  --python "$python" ${extra[@]+"${extra[@]}"} -- "${cmd[@]}"
