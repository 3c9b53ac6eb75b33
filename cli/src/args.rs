//! The command line: flags shared with kubectl (`--kubeconfig`, `--context`,
//! `-n`), one subcommand per verb with its examples, and the parsing of
//! values (`--for`, `--timeout`) before anything touches the cluster.
//! Running a verb is left to its module.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cluster::TargetArgs;
use crate::wait::WaitFor;

const EXAMPLES: &str = "\
Examples:
  kubectl wrenn exec hello -- uname -a
  kubectl wrenn shell hello
  kubectl wrenn exec -d --tag web hello -- python3 -m http.server
  kubectl wrenn ps hello
  kubectl wrenn logs -f hello web
  kubectl wrenn kill hello web
  kubectl wrenn cp ./data hello:/srv/data
  kubectl wrenn console -f hello
  kubectl wrenn port-forward hello 8888 9000:80
  kubectl wrenn pause hello && kubectl wrenn resume hello
  kubectl wrenn suspend -n team-a hello
  kubectl wrenn snapshot hello before-upgrade
  kubectl wrenn fork hello hello-2
  kubectl wrenn wait hello --for=condition=Ready --timeout=2m
  kubectl wrenn status hello

Every verb uses your kubeconfig and its namespace, as kubectl does; the
API server's RBAC decides what you may do. `exec`, `shell` and `attach`
exit with the command's exit code; every other failure exits with 1.";

/// kubectl plugin for Wrenn capsules.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-wrenn",
    bin_name = "kubectl wrenn",
    version,
    about,
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Which cluster, user and namespace.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// How long a verb waits for the operator to report the result.
#[derive(Debug, Args, Clone, Copy, PartialEq, Eq)]
pub struct WaitArgs {
    /// Return once the API server accepted the change, without waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (e.g. `90s`, `5m`).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

impl WaitArgs {
    /// The wait's deadline, or `None` with `--no-wait`.
    pub fn timeout(self) -> Option<Duration> {
        (!self.no_wait).then_some(self.timeout)
    }
}

/// The verbs. Each names the capsule it acts on in the chosen namespace.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a running capsule, as `kubectl exec` does in a Pod.
    #[command(after_help = "\
Examples:
  kubectl wrenn exec hello -- uname -a
  kubectl wrenn exec -it hello -- sh
  echo 'print(6*7)' | kubectl wrenn exec -i hello -- python3
  kubectl wrenn exec -d --tag web hello -- python3 -m http.server

Exits with the command's exit code. -t takes effect only when stdin is a
terminal; the terminal follows window size changes. With -d the command
runs detached: it outlives this call, its output is kept in the capsule
(the newest 1 MiB) for `logs` and `attach`, and `ps` and `kill` find it by
its --tag or pid.")]
    Exec {
        /// Pass stdin to the command; its end closes the command's stdin.
        #[arg(short = 'i', long, conflicts_with = "detach")]
        stdin: bool,
        /// Run the command on a terminal (PTY).
        #[arg(short = 't', long, conflicts_with = "detach")]
        tty: bool,
        /// Start the command detached and return at once (it reads no stdin).
        #[arg(short = 'd', long)]
        detach: bool,
        /// Name the detached command for ps, logs, attach and kill (unique
        /// among running ones; 1 to 63 of A-Z a-z 0-9 . _ -).
        #[arg(long, requires = "detach", value_name = "TAG")]
        tag: Option<String>,
        /// The capsule.
        capsule: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Forward local ports to ports a capsule declares (spec.network.ports).
    #[command(after_help = "\
Examples:
  kubectl wrenn port-forward hello 8888          # localhost:8888 -> 8888
  kubectl wrenn port-forward hello 9000:80 :5432 # any free port -> 5432
  kubectl wrenn port-forward --address 0.0.0.0 hello 8888

Each local connection is carried through the API server as your user
(RBAC: create on capsules/portforward); servers bound to 127.0.0.1 inside
the capsule are reached too. Runs until Ctrl-C.")]
    PortForward {
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
        address: std::net::IpAddr,
        /// The capsule.
        capsule: String,
        /// `[LOCAL:]REMOTE` port pairs.
        #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<String>,
    },
    /// An interactive /bin/sh in a running capsule (`exec -it CAP -- /bin/sh`).
    #[command(after_help = "\
Examples:
  kubectl wrenn shell hello
  kubectl wrenn shell -n team-a hello")]
    Shell {
        /// The capsule.
        capsule: String,
    },
    /// List the detached processes of a capsule, running and exited.
    #[command(after_help = "\
Examples:
  kubectl wrenn ps hello")]
    Ps {
        /// The capsule.
        capsule: String,
    },
    /// Send a signal to a detached process (its process group), by pid or tag.
    #[command(after_help = "\
Examples:
  kubectl wrenn kill hello web
  kubectl wrenn kill hello 4242 -s KILL")]
    Kill {
        /// The capsule.
        capsule: String,
        /// The process: a pid (all digits) or a tag.
        process: String,
        /// Signal name or number.
        #[arg(short = 's', long, default_value = "TERM", value_name = "SIGNAL")]
        signal: String,
    },
    /// Print the output a detached process wrote (what the capsule keeps of it).
    #[command(after_help = "\
Examples:
  kubectl wrenn logs hello web
  kubectl wrenn logs -f hello web          # and follow until it exits")]
    Logs {
        /// Keep printing new output until the process exits.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The capsule.
        capsule: String,
        /// The process: a pid (all digits) or a tag.
        process: String,
    },
    /// Follow a detached process's output until it exits, and exit with its code.
    #[command(after_help = "\
Examples:
  kubectl wrenn attach hello web

Prints what the capsule kept since the process started, then what it
prints next; ends with the process's exit code. ^C detaches: the process
runs on.")]
    Attach {
        /// The capsule.
        capsule: String,
        /// The process: a pid (all digits) or a tag.
        process: String,
    },
    /// Copy a file or a directory between this machine and a capsule.
    #[command(after_help = "\
Examples:
  kubectl wrenn cp ./model.bin hello:/srv/model.bin     # a file up
  kubectl wrenn cp ./notes.txt hello:/tmp/              # into a directory
  kubectl wrenn cp hello:/var/log/app.log ./app.log     # a file down
  kubectl wrenn cp ./site hello:/srv/site               # a directory (its contents), as tar
  kubectl wrenn cp -n team-a hello:/srv/site ./site-copy

One side is CAPSULE:/absolute/path. Files are checked end to end with
SHA-256; directories keep symlinks. Long copies are not cut by the API
server's request timeout.")]
    Cp {
        /// Source: a local path or CAPSULE:/path.
        src: String,
        /// Destination: a local path or CAPSULE:/path.
        dst: String,
    },
    /// Print a capsule's serial console (boot log and what the guest prints there).
    #[command(after_help = "\
Examples:
  kubectl wrenn console hello
  kubectl wrenn console hello --tail=50
  kubectl wrenn console -f hello                        # follow until Ctrl-C")]
    Console {
        /// Keep printing what the guest prints next.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
        /// The capsule.
        capsule: String,
    },
    /// Stop a capsule's vCPUs, keeping its memory (spec.operatingMode: Paused).
    #[command(after_help = "\
Examples:
  kubectl wrenn pause hello                 # waits until the capsule is Paused
  kubectl wrenn pause hello --no-wait")]
    Pause(ModeArgs),
    /// Run a paused or suspended capsule again (spec.operatingMode: Running).
    #[command(after_help = "\
Examples:
  kubectl wrenn resume hello                # waits until the capsule is Running
  kubectl wrenn resume hello --timeout=10m")]
    Resume(ModeArgs),
    /// Write a capsule's memory to its node's disk and release its RAM and
    /// CPU (spec.operatingMode: Suspended).
    #[command(after_help = "\
Examples:
  kubectl wrenn suspend hello               # waits until the capsule is Suspended
  kubectl wrenn suspend hello --no-wait")]
    Suspend(ModeArgs),
    /// Take a CapsuleSnapshot of a capsule and wait until it is Ready.
    #[command(after_help = "\
Examples:
  kubectl wrenn snapshot hello before-upgrade
  kubectl wrenn snapshot hello disk-copy --disk-only --no-wait")]
    Snapshot {
        /// The capsule.
        capsule: String,
        /// Name of the new CapsuleSnapshot.
        name: String,
        /// Disk only (capsules from it boot); the default keeps memory too
        /// (capsules from it resume where it was taken).
        #[arg(long)]
        disk_only: bool,
        /// Waiting.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Copy a capsule: a CapsuleSnapshot named NAME, then a capsule NAME
    /// restored from it with the source's resources, env, network, lifecycle
    /// and node selector; waits until it is Running.
    #[command(after_help = "\
Examples:
  kubectl wrenn fork hello hello-2
  kubectl wrenn fork hello try-it --timeout=10m")]
    Fork {
        /// The capsule to copy.
        capsule: String,
        /// Name of the new capsule and of its snapshot.
        name: String,
        /// Waiting (for the snapshot, then for the new capsule).
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Wait until a capsule reaches a phase or a condition (watches; no polling).
    #[command(after_help = "\
Examples:
  kubectl wrenn wait hello                          # phase Running
  kubectl wrenn wait hello --for=phase=Suspended --timeout=5m
  kubectl wrenn wait hello --for=condition=Ready
  kubectl wrenn wait hello --for=condition=Paused=False

Fails at once when the capsule fails, expires or is deleted.")]
    Wait {
        /// The capsule.
        capsule: String,
        /// `phase=PHASE` or `condition=TYPE[=True|False]`.
        #[arg(long = "for", value_name = "WHAT", default_value = "phase=Running")]
        wait_for: WaitFor,
        /// Give up after this long (e.g. `60s`, `2m`).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Show a capsule's mode, phase, node, address and conditions.
    #[command(after_help = "\
Examples:
  kubectl wrenn status hello")]
    Status {
        /// The capsule.
        capsule: String,
    },
}

/// The capsule of `pause`, `resume` or `suspend` and how long to wait.
#[derive(Debug, Args)]
pub struct ModeArgs {
    /// The capsule.
    pub capsule: String,
    /// Waiting.
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// A Go-style duration (`90s`, `5m`, `1h30m`), as kubectl takes `--timeout`.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = wrenn_operator::resources::parse_duration("timeout", text)
        .map_err(|e| format!("{e}: write it as 90s, 5m or 1h30m"))?;
    if d.is_zero() {
        return Err("a timeout of zero would never wait: use --no-wait".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::PathBuf;

    use super::*;
    use clap::CommandFactory as _;
    use wrenn_crds::capsule::CapsulePhase;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubectl-wrenn").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_the_command_after_the_separator_and_kubectl_flags_anywhere() {
        // kubectl hands a plugin every argument after its name, global flags
        // included, wherever the user put them.
        let cli = parse(&[
            "-n",
            "team-a",
            "exec",
            "-it",
            "box",
            "--context",
            "dev",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        assert_eq!(cli.target.namespace.as_deref(), Some("team-a"));
        assert_eq!(cli.target.context.as_deref(), Some("dev"));
        let Command::Exec {
            stdin,
            tty,
            capsule,
            command,
            ..
        } = cli.command
        else {
            panic!("not exec");
        };
        assert!(stdin && tty);
        assert_eq!(capsule, "box");
        assert_eq!(command, ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn exec_without_a_command_is_refused_before_any_request() {
        assert!(parse(&["exec", "box"]).is_err());
        assert!(parse(&["exec", "box", "--"]).is_err());
    }

    #[test]
    fn a_detached_exec_takes_a_tag_and_no_terminal() {
        let cli = parse(&["exec", "-d", "--tag", "web", "box", "--", "sleep", "9"]).unwrap();
        let Command::Exec { detach, tag, .. } = cli.command else {
            panic!("not exec");
        };
        assert!(detach);
        assert_eq!(tag.as_deref(), Some("web"));
        assert!(parse(&["exec", "--tag", "web", "box", "--", "ls"]).is_err());
        assert!(parse(&["exec", "-d", "-it", "box", "--", "sh"]).is_err());
    }

    #[test]
    fn process_verbs_name_a_capsule_and_a_process() {
        let cli = parse(&["kill", "box", "web", "-s", "KILL"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Kill { ref process, ref signal, .. } if process == "web" && signal == "KILL"
        ));
        let cli = parse(&["logs", "-f", "box", "42"]).unwrap();
        assert!(matches!(cli.command, Command::Logs { follow: true, .. }));
        assert!(parse(&["attach", "box"]).is_err());
    }

    #[test]
    fn kubeconfig_is_a_flag_like_kubectls() {
        let cli = parse(&["status", "box", "--kubeconfig", "/tmp/kc"]).unwrap();
        assert_eq!(cli.target.kubeconfig, Some(PathBuf::from("/tmp/kc")));
        assert_eq!(cli.target.namespace, None);
    }

    #[test]
    fn mode_verbs_wait_five_minutes_unless_told_otherwise() {
        let cli = parse(&["pause", "box"]).unwrap();
        let Command::Pause(m) = cli.command else {
            panic!("not pause");
        };
        assert_eq!(m.wait.timeout(), Some(Duration::from_secs(300)));
        let cli = parse(&["suspend", "box", "--no-wait"]).unwrap();
        let Command::Suspend(m) = cli.command else {
            panic!("not suspend");
        };
        assert_eq!(m.wait.timeout(), None);
        let cli = parse(&["resume", "box", "--timeout=1m30s"]).unwrap();
        let Command::Resume(m) = cli.command else {
            panic!("not resume");
        };
        assert_eq!(m.wait.timeout(), Some(Duration::from_secs(90)));
    }

    #[test]
    fn a_bad_or_zero_timeout_is_refused_with_how_to_write_it() {
        let err = parse(&["wait", "box", "--timeout=soon"]).unwrap_err();
        assert!(err.to_string().contains("90s"), "{err}");
        let err = parse(&["pause", "box", "--timeout=0s"]).unwrap_err();
        assert!(err.to_string().contains("--no-wait"), "{err}");
    }

    #[test]
    fn wait_defaults_to_running_within_a_minute() {
        let cli = parse(&["wait", "box"]).unwrap();
        let Command::Wait {
            wait_for, timeout, ..
        } = cli.command
        else {
            panic!("not wait");
        };
        assert_eq!(wait_for, WaitFor::Phase(CapsulePhase::Running));
        assert_eq!(timeout, Duration::from_secs(60));
        assert!(parse(&["wait", "box", "--for=phase=Sleeping"]).is_err());
    }

    #[test]
    fn snapshot_and_fork_take_two_names() {
        let cli = parse(&["snapshot", "box", "snap", "--disk-only"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Snapshot { ref capsule, ref name, disk_only: true, .. }
                if capsule == "box" && name == "snap"
        ));
        assert!(parse(&["fork", "box"]).is_err());
    }

    #[test]
    fn every_verb_shows_an_example_in_its_help() {
        let mut cli = Cli::command();
        for sub in cli.get_subcommands_mut() {
            let help = sub.render_long_help().to_string();
            let name = sub.get_name().to_string();
            assert!(
                help.contains(&format!("kubectl wrenn {name} ")),
                "`{name} --help` shows no example:\n{help}"
            );
        }
    }
}
