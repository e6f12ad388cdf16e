//! Running one point: the workload started and held until the tracer is
//! attached (so the attach is not timed and the work is traced from its
//! first poll), the load applied (bench-work paces itself; the servers get
//! wrk flat out, or our own paced clients at a fixed rate, since wrk can't
//! hold a rate), and every figure of the run collected.
//!
//! Conditions are interleaved and their order rotates from run to run, so
//! drift on the machine spreads over all of them.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::parse;
use super::plan::{Condition, Load, Measured, Plan, Sample, Workload};
use super::proc::{children_cpu, process_cpu};
use super::stats::median;
use super::tools::Tools;
use super::tracer::Tracer;
use crate::cmd::{self, step};

/// Flat out first, then at half the untraced flat-out throughput.
pub(super) fn measure_workload(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
) -> Result<Vec<Measured>> {
    let flat = measure_point(plan, tools, workload, Load::FlatOut, None)?;
    let untraced = flat
        .iter()
        .find(|m| m.condition == Condition::Untraced)
        .expect("untraced is always a condition");
    let max = median(untraced.samples.iter().map(Sample::throughput));
    let half = measure_point(plan, tools, workload, Load::Half, Some(max / 2.0))?;
    Ok(flat.into_iter().chain(half).collect())
}

fn measure_point(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    load: Load,
    offered: Option<f64>,
) -> Result<Vec<Measured>> {
    let mut measured: Vec<Measured> = plan
        .conditions
        .iter()
        .map(|condition| Measured {
            workload,
            load,
            condition: condition.clone(),
            offered,
            samples: Vec::new(),
        })
        .collect();
    for run in 0..plan.runs {
        // The order rotates so that no condition always follows another.
        for i in 0..measured.len() {
            let m = &mut measured[(i + run) % plan.conditions.len()];
            step(&format!(
                "{} {} {} (run {}/{})",
                workload.name(),
                load.name(),
                m.condition.label(),
                run + 1,
                plan.runs
            ));
            let sample = run_once(plan, tools, workload, offered, &m.condition)
                .with_context(|| format!("{} {}", workload.name(), m.condition.label()))?;
            m.samples.push(sample);
        }
    }
    Ok(measured)
}

/// Starts the workload, attaches the condition's tracer, runs the load and
/// collects every figure.
fn run_once(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    offered: Option<f64>,
    condition: &Condition,
) -> Result<Sample> {
    let mut target = spawn_workload(plan, tools, workload, offered)?;
    let ready_line = target.read_line()?;
    let mut tracer = match condition {
        Condition::Untraced => None,
        _ => Some(Tracer::start(
            tools,
            condition,
            workload,
            target.child.id(),
        )?),
    };
    if let Some(tracer) = &mut tracer {
        tracer.wait_until_attached()?;
    }
    let go = Instant::now();
    let tracer_cpu_at_go = tracer.as_ref().map_or(0.0, |t| process_cpu(t.pid()));
    let cpu_before = children_cpu()?;
    let mut sample = match workload {
        Workload::Http | Workload::Kv => {
            let address = ready_line
                .strip_prefix("ready ")
                .context("the server did not say where it listens")?
                .to_owned();
            let sample = match workload {
                Workload::Kv => kv_load(plan, tools, &address, offered)?,
                _ => http_load(plan, tools, &address, offered)?,
            };
            // The server serves until killed. The load client was reaped
            // already, so what the kill adds to our CPU times is the server's.
            let cpu_before = children_cpu()?;
            target.child.kill().ok();
            target.child.wait()?;
            Sample {
                workload_cpu: children_cpu()? - cpu_before,
                ..sample
            }
        }
        _ => {
            target.go()?;
            let result = parse::result(&target.read_line()?)?;
            let status = target.child.wait()?;
            if !status.success() {
                bail!("the workload failed ({status})");
            }
            Sample {
                workload_cpu: children_cpu()? - cpu_before,
                ..result
            }
        }
    };
    if let Some(tracer) = tracer {
        sample.tracer = Some(tracer.finish(go, tracer_cpu_at_go)?);
    }
    Ok(sample)
}

/// A workload process and its stdout.
struct Target {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// A run that fails (a tracer that can't attach) must not leave the
/// workload's server running behind it.
impl Drop for Target {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Target {
    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the workload exited without a word (see its stderr above)");
        }
        Ok(line.trim_end().to_owned())
    }

    fn go(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("the workload's stdin")?;
        stdin.write_all(b"go\n")?;
        Ok(())
    }
}

fn spawn_workload(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    offered: Option<f64>,
) -> Result<Target> {
    let mut command = match workload {
        Workload::Http => Command::new(&tools.http_server),
        Workload::Kv => Command::new(&tools.kv_server),
        _ => {
            let mut command = Command::new(&tools.work);
            command
                .arg(workload.name())
                .args(["--batch", &workload.batch().to_string()])
                .args(["--seconds", &plan.seconds.to_string()]);
            if let Some(ops_per_second) = offered {
                let batches_per_second = ops_per_second / workload.batch() as f64;
                command.args(["--rate", &batches_per_second.to_string()]);
            }
            command
        }
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", cmd::display(&command)))?;
    let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    Ok(Target { child, stdout })
}

/// bench-kv-load, 64 connections, flat out or at `rate`.
fn kv_load(plan: &Plan, tools: &Tools, address: &str, rate: Option<f64>) -> Result<Sample> {
    let mut command = Command::new(&tools.kv_load);
    command.args([
        "--address",
        address,
        "--seconds",
        &plan.seconds.to_string(),
        "--connections",
        "64",
    ]);
    if let Some(rate) = rate {
        command.args(["--rate", &rate.to_string()]);
    }
    parse::result_in(&cmd::output(&mut command)?)
}

/// Flat out: wrk, one thread and 32 connections. At a fixed rate: our own
/// paced client (wrk can't hold a rate).
fn http_load(plan: &Plan, tools: &Tools, address: &str, rate: Option<f64>) -> Result<Sample> {
    let seconds = plan.seconds;
    match rate {
        None => {
            let out = cmd::output(Command::new("wrk").args([
                "-t1",
                "-c32",
                &format!("-d{}s", seconds.ceil() as u64),
                "--latency",
                &format!("http://{address}/"),
            ]))?;
            parse::wrk(&out)
        }
        Some(rate) => {
            let out = cmd::output(Command::new(&tools.load).args([
                "--address",
                address,
                "--rate",
                &rate.to_string(),
                "--seconds",
                &seconds.to_string(),
            ]))?;
            parse::result_in(&out)
        }
    }
}
