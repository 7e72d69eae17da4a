//! The ring's own logic without a mount: CPU lists, and what a failing queue does.

use std::sync::Arc;

#[test]
fn cpu_lists_count_as_the_kernel_counts_them_or_not_at_all() {
    use super::parse_cpu_list;
    assert_eq!(parse_cpu_list("0-1\n"), Some(2));
    assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
    assert_eq!(parse_cpu_list("0"), Some(1));
    // No guess from anything else: a short count would leave a queue without entries.
    for bad in ["", "x", "3-1", "0-", "0,,1"] {
        assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
    }
}

#[test]
fn a_queue_that_fails_once_serving_ends_the_connection_and_before_refuses_the_ring() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let on_fatal: super::OnFatal = {
        let calls = calls.clone();
        Arc::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
        })
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // A panic, and an error, after the entries were lent: the connection is ended, each time.
    super::guarded(0, &on_fatal, &tx, |started| {
        started.set(true);
        panic!("a bug outside answer")
    });
    super::guarded(0, &on_fatal, &tx, |started| {
        started.set(true);
        Err(std::io::Error::other("refused"))
    });
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(rx.try_recv().is_err(), "nothing to report once started");
    // Before: nothing was lent, so the failure is reported and the connection left alone.
    super::guarded(1, &on_fatal, &tx, |_| panic!("while building"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let e = rx.try_recv().unwrap().unwrap_err();
    assert!(e.to_string().contains("ring queue 1"), "{e}");
    // A queue whose connection ended is no failure.
    super::guarded(0, &on_fatal, &tx, |started| {
        started.set(true);
        Ok(super::End::Closed)
    });
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
