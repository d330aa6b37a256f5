"""`stable-align worlds resume ID`: run a FAILED or CANCELLED world again from the records it has.

The world service (any replica, over ``sandbox.world.resume``; gRPC ``ResumeWorld``) sets the world
RUNNING and runs only the (round, agent) pairs its records stream lacks, so the world ends with
exactly size² × rounds records. Prints the world's new state; with ``--wait`` follows it like
``run`` does and exits 1 unless it completes. An unknown world, or a COMPLETED one, is an error
(exit 1).
"""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.world.client import WorldClient
from stablealign.v1 import world_pb2
from stablealign_app.cli.sandbox import call_world, console, out_console, round_table, worlds_app


def _state(world: world_pb2.World) -> str:
    return world_pb2.WorldState.Name(world.state).removeprefix("WORLD_STATE_")


def worlds_resume(
    world_id: str = typer.Argument(..., help="The world to resume."),
    nats: str = typer.Option("nats://127.0.0.1:4222", "--nats", help="NATS server URL."),
    wait: bool = typer.Option(False, "--wait", help="Follow the world until it ends; exit 1 unless it completes."),
    timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds."),
) -> None:
    """Resume a FAILED or CANCELLED world from its records (no record is redone or duplicated)."""
    async def resume(client: WorldClient) -> world_pb2.World:
        world = await client.resume_world(world_id)
        total = world.spec.size ** 2 * world.spec.rounds
        out_console.print(f"world {world_id}: {_state(world)} ({world.records_published}/{total} records, "
                          f"{world.completed_rounds}/{world.spec.rounds} rounds)", soft_wrap=True)
        if not wait:
            return world
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=not console.is_terminal) as progress:
            task = progress.add_task(f"world {world_id}", total=total)
            return await client.wait_for_world(
                world_id, timeout=timeout, on_progress=lambda w: progress.update(task, completed=w.records_published))

    world = call_world(nats, resume)
    if not wait:
        return
    out_console.print(round_table(world))
    out_console.print(f"world {world_id}: {_state(world)} ({world.records_published} records)"
                      + (f": {world.error}" if world.error else ""), soft_wrap=True)
    if world.state != world_pb2.WORLD_STATE_COMPLETED:
        typer.echo(f"error: world {world_id} ended {_state(world)}: {world.error or '-'}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Adds ``worlds resume`` to the ``worlds`` group that ``stablealign_app.cli.sandbox`` registers."""
    worlds_app.command("resume")(worlds_resume)
