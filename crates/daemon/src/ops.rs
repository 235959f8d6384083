//! Operations: changes that take time, each with an id the client can
//! wait on. Kept in memory (a restarted daemon starts with none).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use api::{Operation, OperationStatus};
use tokio::sync::watch;

/// Ended operations kept for clients that wait late.
const KEEP_ENDED: usize = 256;

#[derive(Default)]
pub struct Operations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    by_id: HashMap<String, watch::Sender<Operation>>,
    ended: std::collections::VecDeque<String>,
}

impl Operations {
    /// Registers a running operation.
    pub fn begin(&self, description: String, instance: &str) -> Operation {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next += 1;
        let op = Operation {
            id: format!("{:016x}", inner.next ^ random_salt()),
            description,
            instance: instance.to_owned(),
            status: OperationStatus::Running,
            error: None,
        };
        let (sender, _) = watch::channel(op.clone());
        inner.by_id.insert(op.id.clone(), sender);
        op
    }

    /// Ends operation `id` with `result`.
    pub fn end(&self, id: &str, result: Result<(), String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = inner.by_id.get(id) {
            sender.send_modify(|op| match result {
                Ok(()) => op.status = OperationStatus::Success,
                Err(e) => {
                    op.status = OperationStatus::Failure;
                    op.error = Some(e);
                }
            });
        }
        inner.ended.push_back(id.to_owned());
        while inner.ended.len() > KEEP_ENDED {
            if let Some(old) = inner.ended.pop_front() {
                inner.by_id.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Operation> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.get(id).map(|s| s.borrow().clone())
    }

    /// Waits up to `timeout` for operation `id` to end; its state then.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Option<Operation> {
        let mut receiver = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.by_id.get(id)?.subscribe()
        };
        let ended = receiver.wait_for(|op| op.status != OperationStatus::Running);
        let _ = tokio::time::timeout(timeout, ended).await;
        let op = receiver.borrow().clone();
        Some(op)
    }

    /// Whether an operation on `instance` is running.
    pub fn running_on(&self, instance: &str) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.values().find_map(|s| {
            let op = s.borrow();
            (op.instance == instance && op.status == OperationStatus::Running)
                .then(|| op.description.clone())
        })
    }
}

/// Operation ids differ between daemon runs.
fn random_salt() -> u64 {
    use std::sync::OnceLock;
    static SALT: OnceLock<u64> = OnceLock::new();
    *SALT.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // SAFETY: getrandom writes at most 8 bytes into `bytes`.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 8, 0) };
        if n == 8 {
            u64::from_le_bytes(bytes) & !0xffff_ffff
        } else {
            u64::from(std::process::id()) << 32
        }
    })
}
