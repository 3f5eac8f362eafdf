//! The command line's parsing rules: durations, modes refusing each other's flags, hidden
//! helpers and measurement knobs.

use clap::CommandFactory;

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("pageserv").chain(args.iter().copied()))
}

const SRC: [&str; 4] = ["src", "--to", "127.0.0.1:7070", "--pid"];

#[test]
fn durations_take_one_form_with_units() {
    assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(duration("2.5s"), Ok(Duration::from_millis(2500)));
    assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
    assert!(duration("-1s").is_err());
    assert!(duration("soon").is_err());
}

#[test]
fn stop_and_copy_refuses_post_copy_flags() {
    for extra in [
        &["--pre-copy", "2"][..],
        &["--batch-pages", "64"],
        &["--idle-timeout", "5s"],
        &["--recover-timeout", "5s"],
        &["--no-push"],
        &["--push-after", "1s"],
    ] {
        let mut args = SRC.to_vec();
        args.extend(["1", "--stop-and-copy"]);
        args.extend(extra);
        let e = parse(&args)
            .err()
            .unwrap_or_else(|| panic!("{extra:?} accepted"));
        assert_eq!(
            e.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{extra:?}: {e}"
        );
        // The same flag is fine for a post-copy source.
        let mut lazy = SRC.to_vec();
        lazy.extend(["1", "--lazy"]);
        lazy.extend(extra);
        assert!(parse(&lazy).is_ok(), "--lazy {extra:?} refused");
    }
    let mut plain = SRC.to_vec();
    plain.extend(["1", "--stop-and-copy", "--congestion", "scavenger"]);
    assert!(parse(&plain).is_ok());
}

#[test]
fn a_runc_container_takes_both_modes() {
    let runc = |extra: &[&str]| {
        let mut args = vec!["src", "--to", "127.0.0.1:7070", "--runc", "web"];
        args.extend(extra);
        parse(&args).map(|_| ())
    };
    assert!(runc(&["--lazy"]).is_ok());
    assert!(runc(&["--lazy", "--pre-copy", "auto"]).is_ok());
    assert!(runc(&["--stop-and-copy", "--runc-root", "/run/r"]).is_ok());
    // Stop-and-copy of a container is pageserv's own checkpoint: not an external dump's.
    let e = runc(&["--stop-and-copy", "--listen-page-server", "127.0.0.1:27000"])
        .expect_err("--runc with --listen-page-server accepted");
    assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
}

#[test]
fn measurement_knobs_only_from_the_lab() {
    let knobs = |extra: &[&str]| {
        let mut args = SRC.to_vec();
        args.extend(["1", "--lazy"]);
        args.extend(extra);
        match parse(&args).map(|c| c.cmd) {
            Ok(Cmd::Src(a)) => a.measure,
            _ => panic!("{extra:?} not parsed"),
        }
    };
    assert!(knobs(&[]).allowed(false).is_ok());
    for extra in [
        &["--no-push"][..],
        &["--push-after", "2s"],
        &["--verify-served"],
    ] {
        let m = knobs(extra);
        let e = m.allowed(false).expect_err("a knob outside the lab");
        assert!(
            e.to_string().contains(extra[0]) && e.to_string().contains("lab"),
            "{e}"
        );
        assert!(m.allowed(true).is_ok(), "{extra:?} refused in the lab");
    }
    let e = knobs(&["--no-push", "--verify-served"])
        .allowed(false)
        .expect_err("two knobs");
    assert!(
        e.to_string().contains("--no-push, --verify-served are"),
        "{e}"
    );
}

#[test]
fn choices_are_enums() {
    let mut args = SRC.to_vec();
    args.extend(["1", "--lazy", "--congestion", "fast"]);
    assert_eq!(
        parse(&args).err().map(|e| e.kind()),
        Some(clap::error::ErrorKind::InvalidValue)
    );
}

#[test]
fn dst_max_concurrent_needs_many_migrations() {
    let dst = ["dst", "--listen", "127.0.0.1:7070"];
    let mut args = dst.to_vec();
    args.extend(["--max-concurrent", "4"]);
    assert!(parse(&args).is_err());
    args.extend(["--keep-serving"]);
    assert!(parse(&args).is_ok());
}

#[test]
fn helper_subcommands_are_hidden() {
    let help = Cli::command().render_help().to_string();
    assert!(
        !help.contains("keep-dump") && !help.contains("keep-uffds"),
        "{help}"
    );
    let src = Cli::command()
        .find_subcommand_mut("src")
        .map(|c| c.render_help().to_string())
        .unwrap_or_default();
    assert!(src.contains("--congestion"));
    assert!(
        !src.contains("--no-push") && !src.contains("--push-after"),
        "{src}"
    );
}

#[test]
fn lab_subcommands_take_their_arguments_as_they_are() {
    for cmd in ["demo", "bench", "quinn-bulk"] {
        let cli = parse(&[cmd, "--help", "--mib", "64"]).expect(cmd);
        let args = match cli.cmd {
            Cmd::Demo(a) | Cmd::Bench(a) | Cmd::QuinnBulk(a) => a.args,
            _ => panic!("{cmd}: not a lab subcommand"),
        };
        assert_eq!(args, ["--help", "--mib", "64"], "{cmd}");
    }
}

#[test]
fn criu_verbosity_is_criu_default_unless_given_and_at_most_4() {
    let common = |cli: Cli| match cli.cmd {
        Cmd::Src(a) => a.common.criu_verbosity,
        Cmd::Dst(a) => a.common.criu_verbosity,
        _ => panic!("not src or dst"),
    };
    let mut src = SRC.to_vec();
    src.extend(["1", "--lazy"]);
    assert_eq!(common(parse(&src).unwrap()), None);
    src.extend(["--criu-verbosity", "4"]);
    assert_eq!(common(parse(&src).unwrap()), Some(4));
    let dst = |v: &str| parse(&["dst", "--listen", "127.0.0.1:7070", "--criu-verbosity", v]);
    assert_eq!(common(dst("0").unwrap()), Some(0));
    for bad in ["5", "-1", "debug"] {
        assert!(dst(bad).is_err(), "{bad} accepted");
    }
}
