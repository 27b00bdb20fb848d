"""`mlxkt launch`: run generate / chat / serve (or any program) as several ranks: ranks on this
machine are started directly, ranks on other hosts through mlx.launch (ssh).

    mlxkt launch -n 2 -- generate --model M --prompt hi          two local ranks (tests)
    mlxkt launch -n 2 --backend nccl -- generate --model M ...   two local NVIDIA GPUs
    mlxkt launch --hosts 10.0.5.1,10.0.5.2 -- serve M             two Macs over Thunderbolt
    mlxkt launch --hostfile hosts.json --backend jaccl -- chat --model M

Light module: nothing heavy is imported until the command runs.
"""

import ipaddress
import sys
from typing import Dict, List, Optional, Tuple

import typer
from typing_extensions import Annotated

SUBCOMMANDS = ("generate", "chat", "serve")
BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")
LOCAL_BACKENDS = ("ring", "nccl")  # mlxkt starts these ranks itself when all run on this machine
MODES = ("pipeline", "experts")


def rank_command(command: List[str], mode: str, python: Optional[str]) -> tuple:
    """(argv each rank runs, python for mlx.launch --python or None)."""
    if not command:
        raise ValueError("nothing to launch: give generate|chat|serve ... or a program after --")
    if command[0] in SUBCOMMANDS:
        given = any(a == "--distributed" or a.startswith("--distributed=") for a in command)
        extra = [] if given else ["--distributed", mode]
        return ["-m", "mlxkt.cli", *command, *extra], python or sys.executable
    return list(command), python


def check_options(backend: str, mode: str, ranks: int, hostfile: Optional[str]) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise ValueError(f"--distributed must be pipeline or experts, not {mode!r}")
    if ranks < 1:
        raise ValueError("-n must be at least 1")
    if backend.startswith("jaccl") and not hostfile:
        raise ValueError("the jaccl backend needs --hostfile with the RDMA devices: make one with\n"
                         "  mlx.distributed_config --hosts A,B --over thunderbolt --backend jaccl "
                         "--output-hostfile hosts.json")


def local_count(ranks: int, hosts: Optional[str], hostfile: Optional[str], backend: str) -> int:
    """How many ranks, when all of them run on this machine over the ring or nccl backend
    (mlxkt starts them itself); 0 when some run elsewhere."""
    names = [h.strip() for h in (hosts or "127.0.0.1").split(",") if h.strip()]
    local = hostfile is None and backend in LOCAL_BACKENDS and all(h == "127.0.0.1" for h in names)
    return ranks * len(names) if local else 0


def rank_env(backend: str, timeout: Optional[float], env: Optional[List[str]]) -> Dict[str, str]:
    out = {"MLXKT_DIST_BACKEND": "jaccl" if backend.startswith("jaccl") else backend}
    if timeout is not None:
        out["MLXKT_DIST_TIMEOUT"] = f"{timeout:g}"
    for e in env or []:
        key, sep, value = e.partition("=")
        if not sep or not key:
            raise ValueError(f"--env takes KEY=VALUE, not {e!r}")
        out[key] = value
    return out


def local_ranks(command: List[str], *, ranks: int = 1, mode: str = "experts", timeout: Optional[float] = None,
                port: int = 0, python: Optional[str] = None, env: Optional[List[str]] = None,
                backend: str = "ring") -> Tuple[List[str], Dict[str, str], int]:
    """(argv, environment, first port) for ranks on this machine (nccl: one port, rank 0's)."""
    check_options(backend, mode, ranks, None)
    argv, py = rank_command(command, mode, python)
    from .launch import free_port_run

    first = port or free_port_run(ranks if backend == "ring" else 1)
    return ([py, *argv] if py else argv), rank_env(backend, timeout, env), first


def launch_args(command: List[str], *, ranks: int = 1, hosts: Optional[str] = None,
                hostfile: Optional[str] = None, backend: str = "ring", mode: str = "experts",
                timeout: Optional[float] = None, port: int = 0, python: Optional[str] = None,
                env: Optional[List[str]] = None, verbose: bool = False) -> List[str]:
    """The mlx.launch arguments for ranks on other hosts (raises ValueError on bad options)."""
    check_options(backend, mode, ranks, hostfile)
    args = []
    if hostfile:
        args += ["--hostfile", hostfile]
    else:
        host_list = [h.strip() for h in (hosts or "").split(",") if h.strip()]
        if not host_list:
            raise ValueError("give --hosts (IP addresses) or --hostfile, or -n N for local ranks")
        if backend == "ring":
            for h in host_list:
                try:
                    ipaddress.ip_address(h)
                except ValueError:
                    raise ValueError(f"the ring backend needs IP addresses, not {h!r}: use each Mac's "
                                     "Thunderbolt bridge IP (ipconfig getifaddr bridge0) or --hostfile")
            args += ["--starting-port", str(port or 32323)]
        args += ["--hosts", ",".join(host_list)]
    args += ["-n", str(ranks), "--backend", backend]
    for key, value in rank_env(backend, timeout, env).items():
        args += ["--env", f"{key}={value}"]
    argv, py = rank_command(command, mode, python)
    if py:
        args += ["--python", py]
    if verbose:
        args.append("--verbose")
    return args + ["--", *argv]


def launch_command(
    command: Annotated[List[str], typer.Argument(help="After --: generate|chat|serve with their options, or any program and its arguments.")],
    ranks: Annotated[int, typer.Option("-n", "--ranks", help="Ranks per host; -n 2 without --hosts starts two local ranks.")] = 1,
    hosts: Annotated[Optional[str], typer.Option(help="Comma-separated IP addresses, one per Mac (Thunderbolt bridge IPs); the first is rank 0.")] = None,
    hostfile: Annotated[Optional[str], typer.Option(help="An mlx.launch hostfile (JSON), e.g. written by mlx.distributed_config.")] = None,
    backend: Annotated[str, typer.Option(help="ring (TCP over the Thunderbolt bridge or any network), jaccl (RDMA over Thunderbolt 5; needs --hostfile), mpi, nccl.")] = "ring",
    distributed: Annotated[str, typer.Option("--distributed", help="pipeline or experts: added to generate/chat/serve unless they set it.")] = "experts",
    timeout: Annotated[Optional[float], typer.Option(help="Seconds one step (or joining the group) may take before a rank stops with an error [default: MLXKT_DIST_TIMEOUT or 120].")] = None,
    port: Annotated[int, typer.Option(help="First ring port, one per rank (default: a free one for local ranks, else 32323).")] = 0,
    python: Annotated[Optional[str], typer.Option(help="Python to run on every host (default: this one; the same path must exist on each Mac).")] = None,
    env: Annotated[Optional[List[str]], typer.Option(help="KEY=VALUE set on every rank (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the mlx.launch command and exit.")] = False,
    verbose: Annotated[bool, typer.Option(help="mlx.launch's debug output.")] = False,
) -> None:
    """Start a command on every rank with mlx.launch (rank 0 prints or serves, others follow)."""
    import shlex

    from . import launch

    count = local_count(ranks, hosts, hostfile, backend)
    try:
        if count:
            argv, rank_vars, first = local_ranks(command, ranks=count, mode=distributed, timeout=timeout,
                                                 port=port, python=python, env=env, backend=backend)
        else:
            args = launch_args(command, ranks=ranks, hosts=hosts, hostfile=hostfile, backend=backend,
                               mode=distributed, timeout=timeout, port=port, python=python, env=env,
                               verbose=verbose)
    except (ValueError, RuntimeError) as e:
        typer.echo(f"mlxkt launch: error: {e}", err=True)
        raise typer.Exit(2)
    if count:
        if dry_run:
            ports = ",".join(f"127.0.0.1:{first + r}" for r in range(count))
            if backend == "nccl":
                ports = f"127.0.0.1:{first}, CUDA_VISIBLE_DEVICES per rank"
            settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in rank_vars.items())
            typer.echo(f"MLX_RANK=0..{count - 1} {backend} on {ports} {settings} {shlex.join(argv)}")
            return
        rc = launch.run_local(count, argv, rank_vars, first, backend)
    else:
        if dry_run:
            typer.echo(shlex.join(["mlx.launch", *args]))
            return
        rc = launch.run_mlx_launch(args)
    if rc:
        raise typer.Exit(rc)


if __name__ == "__main__":
    typer.run(launch_command)
