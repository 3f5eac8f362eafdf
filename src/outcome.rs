//! The split-brain rule: what each side does with the two copies of a migrating process tree
//! when something fails. One pure function per side, so the services, the dump keeper and the
//! tests all ask the same question the same way.
//!
//! The rule: before any restored task can have run at the destination, every failure resumes
//! the source (CRIU resumes it when the dump fails). Once a restored task may have run, the
//! source copy is never resumed: it stays frozen (or, once dst holds every page, is ended).
//! Whichever side cannot prove the memory is whole at dst never lets a restored task read a page
//! that did not arrive: dst kills incomplete restored tasks before their uffds close.
//!
//! The source decides from what it *knows*. dst can start the restore only after it has every
//! image, so "images shipped" is the last moment src can be sure no restored task ran; after it,
//! only dst's own report ("the restore failed, nothing ran") lets src resume.

/// What the source knows about the migration when it fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceKnows {
    /// Every image, and the `ImagesDone` that lets dst restore, has been handed to the transport.
    pub images_shipped: bool,
    /// dst reported that the restore failed and nothing it restored ran (it killed the restore).
    pub dst_reported_restore_failed: bool,
    /// dst reported the restore finished: restored tasks run.
    pub restore_finished: bool,
    /// dst reported every lazy page in place.
    pub memory_whole: bool,
    /// This is a retry (`pageserv src --resume`): an earlier attempt shipped its images, so a
    /// restored copy from it may run, and nothing this attempt learns can prove otherwise.
    pub earlier_attempt: bool,
}

/// What happens to the source copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    /// Make the dump fail: CRIU resumes the source tasks. Only when no restored task ran.
    Resume,
    /// Keep the tasks frozen inside the dump (held by the dump keeper), so the migration can be
    /// retried (`pageserv src --resume`) or the user decides.
    KeepFrozen,
    /// End the dump cleanly: CRIU kills the source tasks. Only once dst holds every page.
    End,
}

/// The source's side of the rule.
pub fn source_action(k: SourceKnows) -> SourceAction {
    if k.memory_whole {
        SourceAction::End
    } else if k.restore_finished || k.earlier_attempt {
        SourceAction::KeepFrozen
    } else if !k.images_shipped || k.dst_reported_restore_failed {
        SourceAction::Resume
    } else {
        // dst may have restored and released the tasks; src just has not heard of it.
        SourceAction::KeepFrozen
    }
}

/// What the destination knows when it fails (or its daemon dies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DstKnows {
    /// `criu restore` was started.
    pub restore_started: bool,
    /// The restore finished: restored tasks have been released and may have run.
    pub restore_finished: bool,
    /// Every lazy page of every restored task is in place.
    pub memory_whole: bool,
}

/// What happens to the restored copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DstAction {
    /// Nothing was restored: nothing to do.
    Nothing,
    /// Kill the restore (and every task it made) and tell src, which may then resume the source.
    KillRestoreReportFailed,
    /// Tasks ran but their memory is incomplete: SIGKILL them before their uffds close (never a
    /// silent zero page). The source stays frozen.
    KillIncomplete,
    /// The memory is whole: the restored copy is the live one; keep it.
    Keep,
}

/// The destination's side of the rule.
pub fn dst_action(k: DstKnows) -> DstAction {
    if k.memory_whole {
        DstAction::Keep
    } else if k.restore_finished {
        DstAction::KillIncomplete
    } else if k.restore_started {
        DstAction::KillRestoreReportFailed
    } else {
        DstAction::Nothing
    }
}

/// Live copies after both sides applied the rule: (source runs, restored copy runs).
pub fn live_copies(src: SourceAction, dst: DstAction) -> (bool, bool) {
    (src == SourceAction::Resume, matches!(dst, DstAction::Keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The facts of one migration at the moment of failure; each side sees part of them, and
    /// src's view may lag dst's (a message in flight when the link died).
    #[derive(Debug, Clone, Copy)]
    struct World {
        images_shipped: bool,
        restore_started: bool,
        restore_finished: bool,
        memory_whole: bool,
        src_heard_finished: bool,
        src_heard_whole: bool,
        src_heard_failed: bool,
    }

    fn world() -> impl Strategy<Value = World> {
        // Draw a phase, then which reports reached src.
        (0u8..5, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(phase, a, b, c)| {
            let images_shipped = phase >= 1;
            let restore_started = phase >= 2;
            let restore_finished = phase >= 3;
            let memory_whole = phase >= 4;
            // A restore that started but never finished may have been reported failed.
            let failed = restore_started && !restore_finished && c;
            World {
                images_shipped,
                restore_started,
                restore_finished,
                memory_whole,
                src_heard_finished: restore_finished && a,
                src_heard_whole: memory_whole && b,
                src_heard_failed: failed,
            }
        })
    }

    proptest! {
        /// Never two live copies, and never zero copies with nothing frozen, whatever src heard.
        #[test]
        fn exactly_one_copy_or_a_frozen_source(w in world()) {
            let s = source_action(SourceKnows {
                images_shipped: w.images_shipped,
                dst_reported_restore_failed: w.src_heard_failed,
                restore_finished: w.src_heard_finished,
                memory_whole: w.src_heard_whole,
                earlier_attempt: false,
            });
            let d = dst_action(DstKnows {
                restore_started: w.restore_started,
                restore_finished: w.restore_finished,
                memory_whole: w.memory_whole,
            });
            let (src_live, dst_live) = live_copies(s, d);
            prop_assert!(!(src_live && dst_live), "split brain: {w:?} {s:?} {d:?}");
            let frozen = s == SourceAction::KeepFrozen;
            prop_assert!(src_live || dst_live || frozen, "copy lost: {w:?} {s:?} {d:?}");
            // The source is ended only when dst holds every page.
            if s == SourceAction::End { prop_assert!(w.memory_whole); }
            // Restored tasks with incomplete memory never survive.
            if w.restore_finished && !w.memory_whole { prop_assert_eq!(d, DstAction::KillIncomplete); }
        }
    }

    #[test]
    fn before_any_task_ran_the_source_resumes() {
        assert_eq!(source_action(SourceKnows::default()), SourceAction::Resume);
        let failed = SourceKnows {
            images_shipped: true,
            dst_reported_restore_failed: true,
            ..Default::default()
        };
        assert_eq!(source_action(failed), SourceAction::Resume);
    }

    #[test]
    fn a_retry_never_resumes_the_source() {
        let k = SourceKnows {
            earlier_attempt: true,
            ..Default::default()
        };
        assert_eq!(source_action(k), SourceAction::KeepFrozen);
        let whole = SourceKnows {
            memory_whole: true,
            ..k
        };
        assert_eq!(source_action(whole), SourceAction::End);
    }

    #[test]
    fn silence_after_the_images_keeps_the_source_frozen() {
        let k = SourceKnows {
            images_shipped: true,
            ..Default::default()
        };
        assert_eq!(source_action(k), SourceAction::KeepFrozen);
    }
}
