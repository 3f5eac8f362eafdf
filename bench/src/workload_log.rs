//! The bench workload's log (`bench/workload`): line format and a sans-IO parser.
//!
//! Every line is `<kind> <tag> ...` where the tag names the process (`r` root, `c1`, `c2`, ...
//! children), followed by positional fields and then `key=value` fields. Times are Unix ns
//! (CLOCK_REALTIME), so logs of the source and destination hosts and the bench's own timestamps
//! are comparable.
//!
//! ```text
//! chunk <tag> <i> addr=0x.. first=<page> pages=<n>
//! ready <tag> pid=<pid> mib=<N> pages=<n> chunks=<c> threads=<T> unix_ns=<t>
//! hb <tag> <seq> <unix_ns> <writes_total> reads=<reads_total>
//! check <tag> ok pages=<n> ms=<t> cpu_ms=<t> skipped=<k> zero=<z> unix_ns=<t>
//! check <tag> FAIL page=<i> reason=<r> <details k=v...> bad=<n> pages=<n> ms=<t> cpu_ms=<t> unix_ns=<t>
//! check <tag> FAIL page=<i> reason=<r> <details k=v...> bad=<n> pages=<n> ms=<t> by=hb unix_ns=<t>   (a heartbeat read)
//! churn <tag> fork ok|FAIL pid=<p> chunk=<c> ... unix_ns=<t>
//! churn <tag> forkchild FAIL chunk=<c> page=<i> reason=<r> ...   (from the forked child)
//! churn <tag> dontneed|reinit first=<i> count=<n> unix_ns=<t>
//! churn <tag> mremap chunk=<c> from=0x.. to=0x.. pages=<n> unix_ns=<t>
//! churn <tag> <what> FAIL error="..." unix_ns=<t>
//! child <tag> <child-tag> pid=<p> status=<code> unix_ns=<t>
//! exit <tag> checks_ok=<n> checks_failed=<m> churn_failed=<k> children_failed=<j> writes=<w> reads=<r> unix_ns=<t>
//! error <tag> <free text>
//! ```
//!
//! [`parse_line`] turns one line into an [`Event`]; [`Summary`] aggregates a whole log per tag
//! (heartbeat gaps, checks, write rate over windows).

mod summary;

pub use summary::{Count, Gap, Summary, TagSummary, Verification};

/// Lines longer than this are rejected (the workload writes < 300 bytes).
pub const MAX_LINE: usize = 4096;

/// One parsed log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Chunk(ChunkInfo),
    Ready(Ready),
    /// `hb`; the tag sits beside the sample so the summary can store bare samples.
    Heartbeat {
        tag: String,
        hb: Heartbeat,
    },
    Check(Check),
    Churn(Churn),
    Child(ChildExit),
    Exit(Exit),
    /// `error <tag> <text>`: the workload could not do something it reports nowhere else.
    Error {
        tag: String,
        text: String,
    },
}

impl Event {
    /// The process tag of the line.
    pub fn tag(&self) -> &str {
        match self {
            Event::Chunk(e) => &e.tag,
            Event::Ready(e) => &e.tag,
            Event::Heartbeat { tag, .. } => tag,
            Event::Check(e) => &e.tag,
            Event::Churn(e) => &e.tag,
            Event::Child(e) => &e.tag,
            Event::Exit(e) => &e.tag,
            Event::Error { tag, .. } => tag,
        }
    }
}

/// A memory chunk's address at start (it moves under `--churn`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkInfo {
    pub tag: String,
    pub index: u64,
    pub addr: u64,
    /// Global index of the chunk's first page.
    pub first: u64,
    pub pages: u64,
}

/// The process finished initialising its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    pub tag: String,
    /// As the process sees it (1 when it is a pid namespace's init).
    pub pid: i64,
    pub mib: u64,
    pub pages: u64,
    pub unix_ns: u64,
}

/// `hb`: the process was running at `unix_ns`, having done `writes` page writes and its
/// heartbeat thread `reads` page reads (`--hb-reads`; 0 in logs of workloads before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub unix_ns: u64,
    pub writes: u64,
    pub reads: u64,
}

/// One full self-check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub tag: String,
    pub ok: bool,
    /// Pages verified.
    pub pages: u64,
    /// Wall-clock duration of the pass.
    pub ms: f64,
    /// CPU time of the pass (the checker thread's).
    pub cpu_ms: Option<f64>,
    pub unix_ns: u64,
    pub fail: Option<CheckFail>,
}

/// The first bad page of a failed check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckFail {
    pub page: u64,
    /// magic | index | version | payload | nonzero
    pub reason: String,
    /// The rest of the line after the reason (details, bad=, ...).
    pub detail: String,
}

/// A churn operation (fork, forkchild, dontneed, reinit, mremap).
#[derive(Debug, Clone, PartialEq)]
pub struct Churn {
    pub tag: String,
    pub what: String,
    pub ok: bool,
    /// Absent on `forkchild` lines.
    pub unix_ns: Option<u64>,
    /// The key=value fields after the verdict.
    pub detail: String,
}

/// A child process the root reaped.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildExit {
    /// The parent's tag.
    pub tag: String,
    pub child: String,
    pub pid: i64,
    /// Exit code, 128 + signal if killed, -1 if it could not be waited for.
    pub status: i64,
    pub unix_ns: u64,
}

/// The process is exiting after SIGTERM.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub tag: String,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub churn_failed: u64,
    pub children_failed: u64,
    pub writes: u64,
    /// Pages the heartbeat thread read (`--hb-reads`).
    pub reads: u64,
    pub unix_ns: u64,
}

/// Why a line is not a valid workload log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line of {0} bytes is longer than the {MAX_LINE}-byte limit")]
    TooLong(usize),
    #[error(
        "unknown line kind {0:?} (expected chunk, ready, hb, check, churn, child, exit, error)"
    )]
    UnknownKind(String),
    #[error("{kind} line lacks its {field} field")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind} line's {field} field {value:?} is not a valid number")]
    BadNumber {
        kind: &'static str,
        field: &'static str,
        value: String,
    },
    #[error("check line verdict {0:?} is neither ok nor FAIL")]
    BadVerdict(String),
}

/// A bad line of a log, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workload log line {line}: {error} (is the log from another workload version?)")]
pub struct ParseError {
    pub line: usize,
    pub error: LineError,
}

/// The complete lines of `text`: everything up to its last newline. A line still being written
/// (no newline yet) is left for the next read.
pub fn complete_lines(text: &str) -> &str {
    text.rfind('\n').map_or("", |i| &text[..=i])
}

/// Parses the complete lines of `text` (see [`complete_lines`]); blank lines are skipped.
pub fn parse_log(text: &str) -> (Vec<Event>, Vec<ParseError>) {
    let mut events = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in complete_lines(text).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(e) => events.push(e),
            Err(error) => errors.push(ParseError { line: i + 1, error }),
        }
    }
    (events, errors)
}

/// Heartbeats (tag, seq) whose sequence number does not exceed the one before it of the same
/// process: a process restored again from an earlier state (rolled back) repeats its numbers.
/// Empty for a log that only ever moved forward.
pub fn rolled_back_heartbeats(events: &[Event]) -> Vec<(String, u64)> {
    let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for e in events {
        if let Event::Heartbeat { tag, hb } = e {
            if let Some(&prev) = last.get(tag.as_str())
                && hb.seq <= prev
            {
                out.push((tag.clone(), hb.seq));
            }
            last.insert(tag, hb.seq);
        }
    }
    out
}

struct Fields<'a> {
    kind: &'static str,
    positional: Vec<&'a str>,
    keyed: Vec<(&'a str, &'a str)>,
}

impl<'a> Fields<'a> {
    fn new(kind: &'static str, tokens: &[&'a str]) -> Self {
        let (keyed, positional): (Vec<&str>, Vec<&str>) =
            tokens.iter().partition(|t| t.contains('='));
        let keyed = keyed
            .into_iter()
            .filter_map(|t| t.split_once('='))
            .collect();
        Fields {
            kind,
            positional,
            keyed,
        }
    }
    fn pos(&self, i: usize, field: &'static str) -> Result<&'a str, LineError> {
        self.positional.get(i).copied().ok_or(LineError::Missing {
            kind: self.kind,
            field,
        })
    }
    fn key(&self, field: &'static str) -> Result<&'a str, LineError> {
        self.keyed
            .iter()
            .find(|(k, _)| *k == field)
            .map(|(_, v)| *v)
            .ok_or(LineError::Missing {
                kind: self.kind,
                field,
            })
    }
    fn num<T: ParseNum>(&self, field: &'static str, value: &str) -> Result<T, LineError> {
        T::parse_num(value).ok_or_else(|| LineError::BadNumber {
            kind: self.kind,
            field,
            value: value.chars().take(64).collect(),
        })
    }
    fn pos_num<T: ParseNum>(&self, i: usize, field: &'static str) -> Result<T, LineError> {
        self.num(field, self.pos(i, field)?)
    }
    fn key_num<T: ParseNum>(&self, field: &'static str) -> Result<T, LineError> {
        self.num(field, self.key(field)?)
    }
    fn opt_num<T: ParseNum>(&self, field: &'static str) -> Result<Option<T>, LineError> {
        self.key(field).ok().map(|v| self.num(field, v)).transpose()
    }
}

trait ParseNum: Sized {
    fn parse_num(s: &str) -> Option<Self>;
}
impl ParseNum for u64 {
    /// Decimal, or hex with 0x (addresses).
    fn parse_num(s: &str) -> Option<Self> {
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    }
}
impl ParseNum for i64 {
    fn parse_num(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}
impl ParseNum for f64 {
    fn parse_num(s: &str) -> Option<Self> {
        s.parse().ok().filter(|v: &f64| v.is_finite())
    }
}

/// The text after the first `n` whitespace-separated tokens of `line`.
fn rest_after(line: &str, n: usize) -> String {
    let mut rest = line.trim_start();
    for _ in 0..n {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest = rest[end..].trim_start();
    }
    rest.trim_end().to_string()
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Result<Event, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong(line.len()));
    }
    let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
    let kind = tokens.first().copied().unwrap_or("");
    let Some(kind) = [
        "chunk", "ready", "hb", "check", "churn", "child", "exit", "error",
    ]
    .into_iter()
    .find(|k| *k == kind) else {
        return Err(LineError::UnknownKind(kind.chars().take(32).collect()));
    };
    let f = Fields::new(kind, &tokens[1..]);
    let tag = f.pos(0, "tag")?.to_string();
    Ok(match kind {
        "chunk" => Event::Chunk(ChunkInfo {
            tag,
            index: f.pos_num(1, "index")?,
            addr: f.key_num("addr")?,
            first: f.key_num("first")?,
            pages: f.key_num("pages")?,
        }),
        "ready" => Event::Ready(Ready {
            tag,
            pid: f.key_num("pid")?,
            mib: f.key_num("mib")?,
            pages: f.key_num("pages")?,
            unix_ns: f.key_num("unix_ns")?,
        }),
        "hb" => Event::Heartbeat {
            tag,
            hb: Heartbeat {
                seq: f.pos_num(1, "seq")?,
                unix_ns: f.pos_num(2, "unix_ns")?,
                writes: f.pos_num(3, "writes_total")?,
                reads: f.opt_num("reads")?.unwrap_or(0),
            },
        },
        "check" => {
            let verdict = f.pos(1, "verdict")?;
            let fail = match verdict {
                "ok" => None,
                "FAIL" => Some(CheckFail {
                    page: f.key_num("page")?,
                    reason: f.key("reason")?.to_string(),
                    detail: rest_after(line, 5),
                }),
                other => return Err(LineError::BadVerdict(other.chars().take(32).collect())),
            };
            Event::Check(Check {
                tag,
                ok: fail.is_none(),
                pages: f.key_num("pages")?,
                ms: f.key_num("ms")?,
                cpu_ms: f.opt_num("cpu_ms")?,
                unix_ns: f.key_num("unix_ns")?,
                fail,
            })
        }
        "churn" => {
            let what = f.pos(1, "what")?.to_string();
            let verdict = f.positional.get(2).copied();
            let ok = verdict != Some("FAIL");
            let skip = if matches!(verdict, Some("ok" | "FAIL")) {
                4
            } else {
                3
            };
            Event::Churn(Churn {
                tag,
                what,
                ok,
                unix_ns: f.opt_num("unix_ns")?,
                detail: rest_after(line, skip),
            })
        }
        "child" => Event::Child(ChildExit {
            tag,
            child: f.pos(1, "child")?.to_string(),
            pid: f.key_num("pid")?,
            status: f.key_num("status")?,
            unix_ns: f.key_num("unix_ns")?,
        }),
        "exit" => Event::Exit(Exit {
            tag,
            checks_ok: f.key_num("checks_ok")?,
            checks_failed: f.key_num("checks_failed")?,
            churn_failed: f.opt_num("churn_failed")?.unwrap_or(0),
            children_failed: f.opt_num("children_failed")?.unwrap_or(0),
            writes: f.opt_num("writes")?.unwrap_or(0),
            reads: f.opt_num("reads")?.unwrap_or(0),
            unix_ns: f.key_num("unix_ns")?,
        }),
        _ => Event::Error {
            tag,
            text: rest_after(line, 2),
        },
    })
}
