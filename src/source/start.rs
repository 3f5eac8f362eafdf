//! How a migration's first link to dst comes about: a fresh start (hello, fault connection,
//! pre-copy rounds, the dump) or a rejoin of a migration dst still runs (`--resume` after only
//! src died); the migration id and the files a dump's work directory keeps for a retry.

use crate::keys::Identity;
use crate::pb::pageserv::{Hello, ResumeReady, control::Msg};
use crate::protocol::{self, Role, any_addr, connect_control, is_dst_answer, next_ctl, send_ctl};
use crate::source::open_dump::DumpSource;
use crate::source::options::SourceOptions;
use crate::source::pre_copy::held::HeldMemory;
use crate::source::pre_copy::{self, PreCopyReport};
use crate::source::recovery::{self, DstConnections, MissingList, Reconnect};
use crate::transport::{self, FrameReceiver, FrameSender};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A migration id nobody can guess: with it, a reconnecting source continues the migration at
/// dst, so it must name this migration and no other.
pub(super) fn new_migration_id() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the migration id")?;
    Ok(format!(
        "m{}-{}-{:016x}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        std::process::id(),
        u64::from_ne_bytes(bytes)
    ))
}

/// The file in a dump's work directory that names its migration, so `pageserv src --resume`
/// can first try to continue that migration at dst.
pub const MIGRATION_ID_FILE: &str = "migration-id";

/// Writes `text` to `path` readable by its owner only (0600, also when it existed): the
/// migration id is half of what joins a running migration at dst.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

/// The file in a dump's work directory that lists the CRIU options its restore needs (one a
/// line; see [`crate::criu::opts`]), so a `--resume` sends them too.
pub const CARRIED_OPTS_FILE: &str = "restore-criu-opts";

pub(super) fn read_carried_opts(work: &Path) -> Vec<String> {
    std::fs::read_to_string(work.join(CARRIED_OPTS_FILE))
        .map(|t| {
            t.lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The dump's work directory (where its keeper listens), if pageserv has one.
pub(super) fn dump_work_dir(opts: &SourceOptions) -> Option<PathBuf> {
    match &opts.dump {
        DumpSource::Pid { .. } => Some(opts.work_dir.clone()),
        DumpSource::Resume { work } => Some(work.clone()),
        DumpSource::External { .. } | DumpSource::Runc(_) => None,
    }
}

/// How a migration's first link came about.
pub(super) struct Start {
    pub(super) link: DstConnections,
    pub(super) fault_stream: (FrameSender, FrameReceiver),
    pub(super) migration_id: String,
    pub(super) pre: Option<(HeldMemory, PreCopyReport)>,
    /// Continuing a migration dst still runs (`--resume` after src died): what dst lacks.
    pub(super) rejoin: Option<(MissingList, ResumeReady)>,
    pub(super) wire_at_freeze: u64,
}

/// A retry that cannot continue the migration restores the source again from its freeze
/// point: say so plainly, and what it means.
pub(super) fn warn_rollback(migration_id: &str) {
    let text = format!(
        "ROLLBACK: dst no longer runs migration {migration_id}, so this retry ships the frozen \
         dump again and restores the process from the moment it was frozen. A restored copy \
         that ran at dst since then is rolled back: what it computed is lost, files it wrote keep \
         their new contents (CRIU refuses a restore whose open files changed size since the dump: \
         \"has bad size\"), and peers of its sockets saw a connection that now goes back in \
         time (expect resets). If dst may still hold the restored tasks, restart it with the same \
         --work instead: it adopts them and this retry continues the migration without a rollback."
    );
    tracing::warn!("{text}");
    eprintln!("pageserv src: {text}");
}

/// `--resume`: if dst still runs the migration this dump belonged to (only src died), continue
/// it there; `None` if dst does not (it ended or restarted), and the retry starts over.
pub(super) async fn rejoin(
    opts: &SourceOptions,
    id: &Identity,
    migration_id: &str,
) -> Option<Start> {
    let r = Reconnect {
        id,
        to: opts.to,
        dst_name: &opts.dst_name,
        migration_id,
        criu_version: opts.criu.version.to_string(),
        push_transport: &opts.push_transport,
        fault_transport: &opts.fault_transport(),
    };
    let deadline = tokio::time::Instant::now()
        + opts
            .push_transport
            .idle_timeout
            .min(Duration::from_secs(15));
    match recovery::reconnect(&r, deadline).await {
        Ok(resumed) => {
            tracing::info!(
                migration = %protocol::id_tag(migration_id),
                "dst still runs this migration: continuing it"
            );
            let wire_at_freeze = resumed.link.tx_bytes();
            Some(Start {
                link: resumed.link,
                fault_stream: resumed.fault_stream,
                migration_id: migration_id.to_string(),
                pre: None,
                rejoin: Some((resumed.missing, resumed.ready)),
                wire_at_freeze,
            })
        }
        Err(e) => {
            tracing::info!(
                migration = %protocol::id_tag(migration_id),
                "not continuing the migration at dst ({e:#}): starting it over from the frozen dump"
            );
            None
        }
    }
}

/// A new migration: hello, the fault connection, pre-copy rounds.
pub(super) async fn start_fresh(opts: &SourceOptions, id: &Identity) -> Result<Start> {
    let (conn, mut ctl, mut ctl_rx) =
        connect_control(id, opts.to, &opts.dst_name, &opts.push_transport).await?;

    let migration_id = new_migration_id()?;
    // The restore options the dump will call for, so dst can start its restore now.
    let announced = dump_work_dir(opts)
        .map(|d| read_carried_opts(&d))
        .unwrap_or_default();
    send_ctl(
        &mut ctl,
        Msg::Hello(Hello {
            restore_criu_opts: announced,
            ..protocol::hello(
                Role::Src,
                opts.criu.version.to_string(),
                migration_id.clone(),
            )
        }),
    )
    .await?;
    let fault_at = match next_ctl(&mut ctl_rx).await? {
        Msg::Hello(h) if is_dst_answer(&h) => {
            if h.criu_version != opts.criu.version.to_string() {
                tracing::warn!(
                    src = %opts.criu.version, dst = %h.criu_version,
                    "CRIU versions differ between the hosts; images may not restore"
                );
            }
            protocol::fault_addr(opts.to, &h)
        }
        Msg::Abort(a) => bail!("dst refused the migration: {}", a.reason),
        other => bail!(
            "dst answered the hello with {other:?}; is it a pageserv dst of the same version?"
        ),
    };

    // Faults get a connection of their own: on the push connection a fault reply would queue
    // behind every pushed byte already in flight, which no stream priority can overtake.
    let fault_conn = transport::connect_with(
        any_addr(opts.to),
        fault_at,
        &opts.dst_name,
        id,
        &opts.fault_transport(),
    )
    .await
    .with_context(|| format!("opening the fault connection to {fault_at}"))?;
    let (fault_send, fault_recv) = fault_conn
        .open_bi()
        .await
        .context("opening the fault stream")?;
    let mut fault_tx = FrameSender::new(fault_send);
    send_ctl(
        &mut fault_tx,
        Msg::Hello(protocol::hello(
            Role::SrcFaults,
            opts.criu.version.to_string(),
            migration_id.clone(),
        )),
    )
    .await?;
    let fault_stream = (fault_tx, FrameReceiver::new(fault_recv));

    // Pre-copy rounds go on the control stream, ahead of the images: dst holds every pre-copied
    // page before it restores.
    let pre = match (&opts.pre_copy, &opts.dump) {
        (Some(cfg), DumpSource::Pid { pid, .. }) => Some(
            pre_copy::rounds::run(*pid, *cfg, &mut ctl)
                .await
                .context("pre-copy rounds (the tasks were never frozen)")?,
        ),
        (Some(cfg), DumpSource::Runc(r)) => {
            // The container's process tree, from its init as runc reports it.
            let pid = r
                .runc
                .running(&r.name)
                .with_context(|| format!("finding container {}'s processes", r.name))?
                .pid;
            Some(
                pre_copy::rounds::run(pid, *cfg, &mut ctl)
                    .await
                    .context("pre-copy rounds (the container was never frozen)")?,
            )
        }
        (Some(_), DumpSource::External { .. }) => {
            bail!("--pre-copy needs --pid: pageserv reads the tree's memory before it dumps it")
        }
        (Some(_), DumpSource::Resume { .. }) => bail!(
            "--pre-copy cannot be combined with --resume: the source is already frozen, so the \
             retry is a plain post-copy; drop --pre-copy"
        ),
        (None, _) => None,
    };
    let link = DstConnections {
        conn,
        fault_conn,
        ctl,
        ctl_rx,
    };
    let wire_at_freeze = link.tx_bytes();
    Ok(Start {
        link,
        fault_stream,
        migration_id,
        pre,
        rejoin: None,
        wire_at_freeze,
    })
}
