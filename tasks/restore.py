"""Recompute what `many gc --keep-last` collected as superseded (docs/design.md §3.4): the recomputable outputs of a
chain's links (tasks.catalog.recomputable_outputs, e.g. merge[t]'s state once merge[t + 1] has read it).

Their manifests stay, so a cached rerun (manifests only) and the next incremental step (it reads the newest link's
state, which no later link has read, so gc kept it) never notice. A stage that does read a collected output — a
link computed after the stream changed at t, reading merge[t − 1]'s state — first recomputes the link that produced
it, and before that, the links its own inputs need, back to the newest one whose blobs are still there. A link
recomputes from its manifest alone: stage, config and inputs; its compute is deterministic (tasks/merge.py runs
every group on one torch thread), so the re-put blob has the digest the consumer's input names.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from tasks.store import BlobRef, Manifest, Store, StoreError

Recompute = Callable[[Manifest], Manifest]  # the producer's manifest → its manifest after recomputing it


def _producer(store: Store, stage: str, ref: BlobRef, outputs: Collection[str]) -> Manifest | None:
    """The manifest of `stage` that has `ref` as one of its recomputable `outputs`, or None."""
    for manifest in store.manifests(stage):
        if any(manifest.outputs.get(name) == ref for name in outputs):
            return manifest
    return None


def restore_inputs(store: Store, stage: str, inputs: Mapping[str, BlobRef], recompute: Recompute,
                   recomputable: Mapping[str, Collection[str]]) -> list[Manifest]:
    """Make every input of a `stage` about to compute readable again: each one whose blob is gone and that is a
    recomputable output of an earlier link of the same stage is recomputed (`recompute`, oldest link first, each
    after the inputs it needs itself). Returns the manifests recomputed, oldest first. An input that is missing for
    another reason is left alone: reading it raises CorruptArtifact, as before (`many run --repair`)."""
    outputs = recomputable.get(stage, ())
    done: list[Manifest] = []
    if not outputs:
        return done
    pending = [ref for ref in inputs.values() if not store.has_blob(ref.digest)]
    chain: list[tuple[Manifest, BlobRef]] = []  # newest first: the producer of a missing input, its producer, …
    while pending:
        ref = pending.pop()
        producer = _producer(store, stage, ref, outputs)
        if producer is None:
            continue
        chain.append((producer, ref))
        pending += [r for r in producer.inputs.values() if not store.has_blob(r.digest)]
    for producer, ref in reversed(chain):
        if store.has_blob(ref.digest):  # two consumers of one producer: restored already
            continue
        manifest = recompute(producer)
        if manifest.key != producer.key or ref not in manifest.outputs.values():
            raise StoreError(
                f"recomputing {producer.stage} (key {producer.key}) to restore a collected output gave other bytes or "
                "another key: its compute is not deterministic; recompute the chain with `many run --repair`"
            )
        done.append(manifest)
    return done


__all__ = ["Recompute", "restore_inputs"]
