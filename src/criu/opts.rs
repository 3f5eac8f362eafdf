//! CRIU command-line options: finding one in a list, and the ones a restore needs because its
//! dump had them, carried from src to dst.
//!
//! A dump with `--tcp-established` writes connections that `criu restore` refuses to restore
//! without the same option ("Connected TCP socket in image"); the same holds for `--tcp-close`,
//! `--ext-unix-sk` and `--file-locks`. `pageserv src` knows which of them its dump got and sends
//! the list with `ImagesDone`; `pageserv dst` adds them to its restore, so the user names them
//! once, at the source. dst accepts only the options of [`CARRIED`]: a source must not be able to
//! put an arbitrary option (an action script, a root path) on dst's command line.

/// Dump options (long form, short form) and the restore option each one requires.
pub const CARRIED: &[(&str, Option<&str>, &str)] = &[
    ("--tcp-established", None, "--tcp-established"),
    ("--tcp-close", None, "--tcp-close"),
    ("--ext-unix-sk", None, "--ext-unix-sk"),
    ("--file-locks", Some("-l"), "--file-locks"),
];

/// At most this many options in one list (there are only [`CARRIED`] to choose from).
pub const MAX_CARRIED: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CarriedError {
    #[error(
        "the source asked for restore option {0:?}, which pageserv dst does not take from a source \
         (only {allowed}); pass it to pageserv dst with --criu-opt if it is really wanted",
        allowed = CARRIED.iter().map(|c| c.2).collect::<Vec<_>>().join(", ")
    )]
    NotAllowed(String),
    #[error("the source sent {0} restore options; at most {MAX_CARRIED} are accepted")]
    TooMany(usize),
}

/// The restore options the dump options `dump_opts` call for, each once, in [`CARRIED`]'s order.
pub fn for_restore(dump_opts: &[String]) -> Vec<String> {
    CARRIED
        .iter()
        .filter(|(long, short, _)| has_opt(dump_opts, long, *short))
        .map(|(_, _, r)| r.to_string())
        .collect()
}

/// dst: checks the list a source sent.
pub fn accept(received: &[String]) -> Result<Vec<String>, CarriedError> {
    if received.len() > MAX_CARRIED {
        return Err(CarriedError::TooMany(received.len()));
    }
    let mut out: Vec<String> = Vec::new();
    for r in received {
        if !CARRIED.iter().any(|c| c.2 == r.as_str()) {
            return Err(CarriedError::NotAllowed(r.clone()));
        }
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    Ok(out)
}

/// The restore's options: the user's, then each carried one the user did not give already.
pub fn merge(user: &[String], carried: &[String]) -> Vec<String> {
    let mut out = user.to_vec();
    for c in carried {
        if !has_opt(user, c, None) {
            out.push(c.clone());
        }
    }
    out
}

/// Whether CRIU options `opts` contain `long` (as `--x`, `--x=V` or `--x V`) or `short`.
pub fn has_opt(opts: &[String], long: &str, short: Option<&str>) -> bool {
    opts.iter().any(|o| {
        o == long
            || o.strip_prefix(long).is_some_and(|r| r.starts_with('='))
            || short.is_some_and(|s| o == s)
    })
}

/// The value of `--x=V` or `--x V` in `opts`.
pub fn opt_value<'a>(opts: &'a [String], long: &str) -> Option<&'a str> {
    let mut it = opts.iter();
    while let Some(o) = it.next() {
        if o == long {
            return it.next().map(String::as_str);
        }
        if let Some(v) = o.strip_prefix(long).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// Parses a CRIU size (`--ghost-limit 10M`): bytes, or with a K, M or G suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn dump_options_map_to_restore_options() {
        assert_eq!(
            for_restore(&s(&[
                "--tcp-established",
                "--network-lock",
                "nftables",
                "-l"
            ])),
            ["--tcp-established", "--file-locks"]
        );
        assert!(for_restore(&s(&["--shell-job", "--ghost-limit=1G"])).is_empty());
    }

    #[test]
    fn dst_accepts_only_the_carried_options() {
        assert_eq!(
            accept(&s(&["--tcp-established", "--tcp-established"])).unwrap(),
            ["--tcp-established"]
        );
        assert_eq!(
            accept(&s(&["--action-script=/tmp/x"])),
            Err(CarriedError::NotAllowed("--action-script=/tmp/x".into()))
        );
        assert!(matches!(
            accept(&vec!["--tcp-close".to_string(); 17]),
            Err(CarriedError::TooMany(17))
        ));
        assert_eq!(
            merge(
                &s(&["--tcp-established", "--shell-job"]),
                &s(&["--tcp-established", "--ext-unix-sk"])
            ),
            ["--tcp-established", "--shell-job", "--ext-unix-sk"]
        );
    }

    proptest! {
        /// Whatever a source sends, dst's restore gets only options from the allow-list.
        #[test]
        fn accepted_lists_hold_only_carried_options(v in proptest::collection::vec(".{0,30}", 0..20)) {
            if let Ok(ok) = accept(&v) {
                prop_assert!(ok.iter().all(|o| CARRIED.iter().any(|c| c.2 == o.as_str())));
            }
            // And what a dump asks for is always accepted.
            prop_assert!(accept(&for_restore(&v)).is_ok());
        }
    }
}
