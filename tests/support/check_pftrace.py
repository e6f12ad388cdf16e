#!/usr/bin/env python3
"""Checks a Perfetto protobuf trace written by rt-ebpf-trace and prints it as
normalised JSON for the integration tests.

The trace is decoded against Perfetto's own compiled schema (the `perfetto`
Python package: `perfetto.protos.perfetto.trace.perfetto_trace_pb2`); any
decode error or field unknown to that schema fails the check. Then the
invariants the Perfetto UI relies on are checked:

- every sequence starts with SEQ_INCREMENTAL_STATE_CLEARED;
- every interned id (event names, categories, annotation names and string
  values, source locations, function names, frames, callstacks, mappings,
  paths) is defined on
  its sequence before it is used;
- timestamps never go back on a sequence (incremental clock deltas, in the
  clock's `unit_multiplier_ns`, are resolved against the sequence's clock
  snapshot);
- slices are balanced on every track (each BEGIN has an END, no END without
  a BEGIN);
- every flow has both ends (an event in `flow_ids` and one in
  `terminating_flow_ids`), each once. The writer reuses the id of an ended
  flow (a smaller varint), so flows are paired in time order as trace
  processor does: an id starts a flow when none is open under it and the
  next end closes it; a start under an open id is an error. The output
  numbers flows 1, 2, … so that ids are unique as in the JSON trace;
- a wake instant does not name the task it wakes (the poll its flow ends at
  does): the output puts the ended-at poll's `task_id` back on it, as the
  JSON trace has it;
- the process descriptor, and a thread descriptor for every thread track
  used, are present.

Watch traces add: slices of categories "off_cpu" and "finding" on the
worker's tracks (a finding's `callstack_iid` must be interned on its
sequence; the output lists its frames as `args.callstack`), "health"
instants on the process track whose nested annotations (`dict_entries`,
`array_values`) become JSON objects and lists, counters, and samples with
kernel frames (`args.kernel_frames` counts the frames in
"[kernel.kallsyms]").

Output (stdout): the trace in the shape of the tool's Chrome JSON trace, so
the tests assert on both formats alike: {"traceEvents": [...], "metadata":
{...}}, events sorted by time, times in microseconds from the trace start,
slices as "X", instants as "i", flow ends as "s"/"f", counters as "C",
thread names as "M", CPU samples as "i" events of category "sample" whose
`args.stack` lists "function (file:line)" innermost first and whose
`args.task_type` is the task type the sample's root frame names.

Usage: check_pftrace.py TRACE[.gz]. Exit status 0 when the trace is valid;
otherwise 1, with every problem found on stderr.
"""

import gzip
import json
import sys
from collections import defaultdict

from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

INCREMENTAL_STATE_CLEARED = 1
# The first line of an await stack that says what the task waits on
# (tracer-timeline's perfetto::sequence::WAITS_ON_PREFIX).
WAITS_ON_PREFIX = "waits on: "
TASK_FRAME_MAPPING = "[tokio task]"
# Kernel frames' module (tracer-timeline's watch::KERNEL_MODULE).
KERNEL_MAPPING = "[kernel.kallsyms]"


def plain_value(note):
    """A debug annotation's value that is not interned: nested values
    (`dict_entries`, `array_values`) become JSON objects and lists."""
    if note.HasField("uint_value"):
        return note.uint_value
    if note.HasField("int_value"):
        return note.int_value
    if note.HasField("bool_value"):
        return note.bool_value
    if note.HasField("double_value"):
        return note.double_value
    if note.HasField("pointer_value"):
        return hex(note.pointer_value)
    if note.HasField("string_value"):
        return note.string_value
    if note.dict_entries:
        return {entry.name: plain_value(entry) for entry in note.dict_entries}
    if note.array_values:
        return [plain_value(item) for item in note.array_values]
    return None


def callstack_frames(seq, iid, where, problems):
    """The frames of interned callstack `iid` (outermost first), or None."""
    stack = seq.tables["callstacks"].get(iid)
    if stack is None:
        problems.add(f"{where}: undefined callstack {iid}")
        return None
    return [seq.tables["frames"][fid] for fid in stack if fid in seq.tables["frames"]]


class Problems(list):
    def add(self, message):
        if len(self) < 50:
            self.append(message)


def unknown_fields(message, path, problems):
    """Fields the official schema doesn't know: a wrong field number."""
    try:
        from google.protobuf import unknown_fields as uf

        unknown = uf.UnknownFieldSet(message)
        if len(unknown):
            numbers = sorted({field.field_number for field in unknown})
            problems.add(f"{path}: fields {numbers} are not in Perfetto's schema")
    except ImportError:  # older protobuf
        if message.UnknownFields():
            problems.add(f"{path}: fields unknown to Perfetto's schema")
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # older protobuf
            repeated = field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        for item in values:
            unknown_fields(item, f"{path}.{field.name}", problems)


class Sequence:
    def __init__(self, sid):
        self.id = sid
        self.started = False
        self.clock_id = None  # from trace_packet_defaults
        self.track_uuid = None  # track_event_defaults
        self.incremental = {}  # clock id -> last value (ns)
        self.units = {}  # clock id -> unit_multiplier_ns
        self.last_ts = None
        self.tables = defaultdict(dict)  # table name -> iid -> value


def describe_frame(function, source, line):
    if source is None:
        return function
    base = source.rsplit("/", 1)[-1]
    return f"{function} ({base}:{line})" if line else f"{function} ({base})"


def pair_flows(flows, problems):
    """Pairs flow starts and ends in time order (a start before an end at
    the same time), numbers the pairs 1, 2, … in the output, and puts the
    woken task's id back on wake instants. Returns the number of flows."""
    open_flows = {}  # wire id -> (number, start event, owner)
    count = 0
    for ts, kind, _, wire, flow_event, owner in sorted(flows, key=lambda f: f[:3]):
        if kind == 0:
            if wire in open_flows:
                problems.add(f"flow id {wire} starts again at {ts} before its flow ended")
                continue
            count += 1
            flow_event["id"] = count
            open_flows[wire] = (count, flow_event, owner)
            continue
        if wire not in open_flows:
            problems.add(f"flow id {wire} ends at {ts} with no flow open")
            continue
        number, _, start_owner = open_flows.pop(wire)
        flow_event["id"] = number
        wake = start_owner.get("event")
        # Only "wake (driver)" and the like: a bare "wake" inside the waking
        # poll never named the task, and JSON has no instant for it.
        if wake is None or "waker" not in wake["args"] or "task_id" in wake["args"]:
            continue
        woken = owner.get("slice") or (owner.get("event") or {}).get("args", {})
        if "task_id" in woken:
            wake["args"]["task_id"] = woken["task_id"]
            wake["name"] = f"wake task {woken['task_id']}"
    for wire, (number, start, _) in open_flows.items():
        problems.add(f"flow id {wire} (flow {number}) never ends")
    return count


def main(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    problems = Problems()
    trace = pb.Trace()
    try:
        trace.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - any decode failure is the finding
        print(f"{path}: does not decode as perfetto.protos.Trace: {err}", file=sys.stderr)
        return 1
    if not trace.packet:
        problems.add("no packets")

    sequences = {}
    tracks = {}  # uuid -> descriptor
    open_slices = defaultdict(list)  # track uuid -> [(name, cat, ts, args, tid)]
    flows = []  # (ts, 0 start / 1 end, file order, id, flow event, owner)
    events = []
    metadata = None
    primary_clock = None
    trace_start = None

    for index, packet in enumerate(trace.packet):
        where = f"packet {index}"
        unknown_fields(packet, where, problems)
        sid = packet.trusted_packet_sequence_id
        if not sid:
            problems.add(f"{where}: no trusted_packet_sequence_id")
            continue
        seq = sequences.setdefault(sid, Sequence(sid))
        if not seq.started:
            if not packet.sequence_flags & INCREMENTAL_STATE_CLEARED:
                problems.add(f"{where}: sequence {sid} does not start with cleared state")
            seq.started = True
        if packet.HasField("trace_packet_defaults"):
            defaults = packet.trace_packet_defaults
            if defaults.HasField("timestamp_clock_id"):
                seq.clock_id = defaults.timestamp_clock_id
            if defaults.track_event_defaults.HasField("track_uuid"):
                seq.track_uuid = defaults.track_event_defaults.track_uuid
        if packet.HasField("clock_snapshot"):
            snapshot = packet.clock_snapshot
            if snapshot.HasField("primary_trace_clock"):
                primary_clock = snapshot.primary_trace_clock
            for clock in snapshot.clocks:
                unit = clock.unit_multiplier_ns or 1
                if clock.is_incremental:
                    seq.incremental[clock.clock_id] = clock.timestamp * unit
                    seq.units[clock.clock_id] = unit
                elif clock.clock_id == 3 and trace_start is None:
                    trace_start = clock.timestamp
        if packet.HasField("interned_data"):
            interned = packet.interned_data
            for table in ("event_names", "event_categories", "debug_annotation_names"):
                for entry in getattr(interned, table):
                    seq.tables[table][entry.iid] = entry.name
            for table in ("debug_annotation_string_values", "function_names",
                          "source_paths", "mapping_paths"):
                for entry in getattr(interned, table):
                    seq.tables[table][entry.iid] = entry.str.decode("utf-8", "replace")
            for location in interned.source_locations:
                seq.tables["source_locations"][location.iid] = location.function_name
            for mapping in interned.mappings:
                for pid in mapping.path_string_ids:
                    if pid not in seq.tables["mapping_paths"]:
                        problems.add(f"{where}: mapping {mapping.iid} uses undefined path {pid}")
                seq.tables["mappings"][mapping.iid] = "/" + "/".join(
                    seq.tables["mapping_paths"].get(p, "?") for p in mapping.path_string_ids)
            for frame in interned.frames:
                for table, iid in (("function_names", frame.function_name_id),
                                   ("mappings", frame.mapping_id)):
                    if iid not in seq.tables[table]:
                        problems.add(f"{where}: frame {frame.iid} uses undefined {table} {iid}")
                source = None
                if frame.HasField("source_path_iid"):
                    source = seq.tables["source_paths"].get(frame.source_path_iid)
                    if source is None:
                        problems.add(f"{where}: frame {frame.iid} uses undefined source path")
                seq.tables["frames"][frame.iid] = (
                    seq.tables["function_names"].get(frame.function_name_id, "?"),
                    source, frame.line_number,
                    seq.tables["mappings"].get(frame.mapping_id, "?"))
            for callstack in interned.callstacks:
                for fid in callstack.frame_ids:
                    if fid not in seq.tables["frames"]:
                        problems.add(f"{where}: callstack {callstack.iid} uses undefined frame {fid}")
                seq.tables["callstacks"][callstack.iid] = list(callstack.frame_ids)

        # Time.
        ts = None
        if packet.HasField("timestamp"):
            clock = packet.timestamp_clock_id if packet.HasField("timestamp_clock_id") else seq.clock_id
            if clock in seq.incremental:
                seq.incremental[clock] += packet.timestamp * seq.units[clock]
                ts = seq.incremental[clock]
            elif clock is None or clock == 3:
                ts = packet.timestamp
            else:
                problems.add(f"{where}: timestamp on clock {clock} without a snapshot")
            if ts is not None:
                if seq.last_ts is not None and ts < seq.last_ts:
                    problems.add(f"{where}: time goes back on sequence {sid}")
                seq.last_ts = ts

        if packet.HasField("track_descriptor"):
            desc = packet.track_descriptor
            tracks[desc.uuid] = desc
            if desc.HasField("thread") and not (desc.thread.pid and desc.thread.tid):
                problems.add(f"{where}: thread descriptor without pid/tid")
            if desc.HasField("thread"):
                events.append({"ph": "M", "pid": desc.thread.pid, "tid": desc.thread.tid,
                               "name": "thread_name", "_ts": ts or 0,
                               "args": {"name": desc.thread.thread_name},
                               "sort_index": desc.sibling_order_rank})
            if desc.HasField("process"):
                events.append({"ph": "M", "pid": desc.process.pid, "tid": 0, "_ts": 0,
                               "name": "process_name",
                               "args": {"name": desc.process.process_name}})

        if packet.HasField("perf_sample"):
            sample = packet.perf_sample
            stack = seq.tables["callstacks"].get(sample.callstack_iid)
            if stack is None:
                problems.add(f"{where}: sample uses undefined callstack {sample.callstack_iid}")
                continue
            frames = [seq.tables["frames"][fid] for fid in stack if fid in seq.tables["frames"]]
            task_type = None
            if frames and frames[0][3] == "/" + TASK_FRAME_MAPPING:
                task_type = frames[0][0]
                frames = frames[1:]
            kernel = sum(1 for frame in frames if frame[3] == "/" + KERNEL_MAPPING)
            events.append({"ph": "i", "cat": "sample", "name": "sample", "pid": sample.pid,
                           "tid": sample.tid, "_ts": ts,
                           "args": {"task_type": task_type, "kernel_frames": kernel,
                                    "stack": [describe_frame(f, s, l) for f, s, l, _ in reversed(frames)]}})

        if not packet.HasField("track_event"):
            continue
        event = packet.track_event
        uuid = event.track_uuid if event.HasField("track_uuid") else seq.track_uuid
        if uuid not in tracks:
            problems.add(f"{where}: event on track {uuid} without a descriptor before it")
            continue
        track = tracks[uuid]
        tid = track.thread.tid if track.HasField("thread") else 0
        pid = track.thread.pid if track.HasField("thread") else (
            track.process.pid if track.HasField("process") else 0)
        name = None
        if event.HasField("name_iid"):
            name = seq.tables["event_names"].get(event.name_iid)
            if name is None:
                problems.add(f"{where}: undefined event name {event.name_iid}")
        categories = []
        for iid in event.category_iids:
            if iid not in seq.tables["event_categories"]:
                problems.add(f"{where}: undefined category {iid}")
            categories.append(seq.tables["event_categories"].get(iid, "?"))
        args = {}
        if event.HasField("source_location_iid"):
            # A poll's full task type: trace processor's
            # `source.function_name` arg; the JSON trace's `task_type`.
            location = seq.tables["source_locations"].get(event.source_location_iid)
            if location is None:
                problems.add(f"{where}: undefined source location {event.source_location_iid}")
            else:
                args["task_type"] = location
        for note in event.debug_annotations:
            key = seq.tables["debug_annotation_names"].get(note.name_iid)
            if key is None:
                problems.add(f"{where}: undefined annotation name {note.name_iid}")
                continue
            if note.HasField("string_value_iid"):
                value = seq.tables["debug_annotation_string_values"].get(note.string_value_iid)
                if value is None:
                    problems.add(f"{where}: undefined string value {note.string_value_iid}")
                if key == "await_stack" and value is not None:
                    value = value.split("\n")
                    # `waits_on` is the stack's first line when known (the
                    # JSON trace has it as an argument of its own).
                    if value[0].startswith(WAITS_ON_PREFIX):
                        args["waits_on"] = value.pop(0)[len(WAITS_ON_PREFIX):]
                    # The writer leaves out `waits_at`, the stack's first
                    # frame; the JSON trace has both.
                    if not value:
                        continue
                    args["waits_at"] = value[0]
            else:
                value = plain_value(note)
            args[key] = value
        if event.HasField("callstack_iid"):
            # A watch finding's stack: innermost frame first, as "stack".
            frames = callstack_frames(seq, event.callstack_iid, where, problems)
            if frames is not None:
                args["callstack"] = [describe_frame(f, s, l) for f, s, l, _ in reversed(frames)]
        # Trace processor reads the deprecated varint fields (the writer's,
        # 36 and 42) where the fixed64 ones are absent.
        # What the flow's ends belong to: the instant, or the slice (its
        # args once it ended).
        owner = {}
        for flow in list(event.flow_ids) or list(event.flow_ids_old):
            flow_event = {"ph": "s", "cat": "wake", "name": "wake", "id": flow,
                          "pid": pid, "tid": tid, "_ts": ts}
            events.append(flow_event)
            flows.append((ts or 0, 0, len(flows), flow, flow_event, owner))
        for flow in list(event.terminating_flow_ids) or list(event.terminating_flow_ids_old):
            flow_event = {"ph": "f", "bp": "e", "cat": "wake", "name": "wake", "id": flow,
                          "pid": pid, "tid": tid, "_ts": ts}
            events.append(flow_event)
            flows.append((ts or 0, 1, len(flows), flow, flow_event, owner))

        kind = event.type
        if kind == pb.TrackEvent.TYPE_SLICE_BEGIN:
            if name == "park":
                category = "park"
            else:
                category = categories[0] if categories else "poll"
            owner["slice"] = {}
            open_slices[uuid].append((name, category, ts, args, tid, pid, owner["slice"]))
        elif kind == pb.TrackEvent.TYPE_SLICE_END:
            if not open_slices[uuid]:
                problems.add(f"{where}: slice end without a begin on track {uuid}")
                continue
            bname, category, start, bargs, btid, bpid, slice_args = open_slices[uuid].pop()
            merged = dict(bargs)
            merged.update(args)
            merged.setdefault("truncated", False)
            slice_args.update(merged)
            events.append({"ph": "X", "pid": bpid, "tid": btid, "name": bname, "cat": category,
                           "_ts": start, "_dur": ts - start, "args": merged})
        elif kind == pb.TrackEvent.TYPE_INSTANT:
            if name == "rt-ebpf-trace":
                # Objects and lists in the metadata are JSON text there
                # ("findings", an incident's "watch"): back to JSON values.
                for key, value in args.items():
                    if isinstance(value, str) and value[:1] in ("{", "["):
                        try:
                            args[key] = json.loads(value)
                        except ValueError:
                            pass
                metadata = args
                continue
            category = categories[0] if categories else name
            if name.startswith("wake ("):
                # "wake (driver)": a wake outside any poll, who woke in the name.
                category = "wake"
                args["waker"] = name[len("wake ("):-1]
                if "waker_task_id" in args:
                    args["waker"] = f"task {args['waker_task_id']}"
                name = "wake"
            label = name
            if name in ("wake", "spawn") and "task_id" in args:
                label = f"{name} task {args['task_id']}"
            elif name == "task end" and "task_id" in args:
                label = f"end task {args['task_id']}"
            if "waker" in args and args.get("waker") == "task" and "waker_task_id" in args:
                args["waker"] = f"task {args['waker_task_id']}"
            if "by" in args and args.get("by") == "task" and "waker_task_id" in args:
                args["by"] = f"task {args['waker_task_id']}"
            owner["event"] = {"ph": "i", "s": "t", "pid": pid, "tid": tid, "name": label,
                              "cat": category, "_ts": ts, "args": args}
            events.append(owner["event"])
        elif kind == pb.TrackEvent.TYPE_COUNTER:
            events.append({"ph": "C", "pid": pid, "tid": pid, "name": track.name, "_ts": ts,
                           "args": {"value": event.counter_value}})

    for uuid, stack in open_slices.items():
        if stack:
            problems.add(f"track {uuid}: {len(stack)} slices never end")
    flow_count = pair_flows(flows, problems)
    if not any(t.HasField("process") for t in tracks.values()):
        problems.add("no process descriptor")
    if primary_clock is None:
        problems.add("no clock snapshot names the trace's clock")
    if metadata is None:
        problems.add("no metadata instant: the trace was not finished")

    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1

    start = trace_start or 0
    events.sort(key=lambda e: e["_ts"] or 0)
    for e in events:
        e["ts"] = ((e.pop("_ts") or start) - start) / 1000.0
        if "_dur" in e:
            e["dur"] = e.pop("_dur") / 1000.0
    json.dump({"traceEvents": events, "metadata": metadata,
               "flows": flow_count}, sys.stdout)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
