//! A device's I/O thread: waits for queue notifications (eventfds the VMM
//! registers as ioeventfds, so the guest's notify write never leaves the
//! accelerator) and serves the notified queue, off the vCPU threads.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ram::GuestRam;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Activation, ActiveQueue, Interrupt};

/// What a device does with one request, on its I/O thread.
pub trait RequestHandler: Send + 'static {
    /// Serves the descriptor chain `chain` taken from queue `queue`, and
    /// returns how many bytes it wrote into the chain's buffers (the used
    /// length). `Err` means the chain is so malformed that no status could
    /// be reported in it: the device then needs a reset.
    fn handle(
        &mut self,
        queue: usize,
        memory: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
    ) -> Result<u32, RequestError>;
}

/// A request the device could not even answer with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// A device's I/O thread; dropping it stops it (the thread sees the stop
/// between two requests, however busy the guest keeps its queues).
pub struct DeviceThread {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// The I/O thread's side of the stop: an eventfd to wait on, and a flag
/// to check between requests.
pub struct StopSignal {
    pub event: EventFd,
    stopping: Arc<AtomicBool>,
}

impl StopSignal {
    /// Whether the thread must return now.
    pub fn requested(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl DeviceThread {
    /// Runs `body` on a thread named `name`.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(StopSignal) + Send + 'static,
    ) -> io::Result<DeviceThread> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let signal = StopSignal {
            event: stop.try_clone()?,
            stopping: stopping.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(signal))?;
        Ok(DeviceThread {
            stop,
            stopping,
            handle: Some(handle),
        })
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // A failed write still leaves the flag, which the thread checks
        // before it waits again.
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A running I/O thread serving one [`RequestHandler`]; dropping it stops it.
pub struct IoThread {
    _thread: DeviceThread,
}

impl IoThread {
    /// Starts the thread `name` serving the queues of `activation` with
    /// `handler`.
    pub fn spawn(
        name: String,
        activation: Activation,
        handler: impl RequestHandler,
    ) -> io::Result<IoThread> {
        let epoll = Epoll::new()?;
        for (index, q) in activation.queues.iter().enumerate() {
            if let Some(q) = q {
                epoll.ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&q.notify),
                    EpollEvent::new(EventSet::IN, index as u64),
                )?;
            }
        }
        let thread = DeviceThread::spawn(&name, move |stop| {
            if epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&stop.event),
                    EpollEvent::new(EventSet::IN, STOP_TOKEN),
                )
                .is_err()
            {
                tracing::error!("virtio I/O thread: cannot watch its stop event");
                return;
            }
            let mut state = Served {
                memory: activation.memory,
                queues: activation.queues,
                interrupt: activation.interrupt,
                needs_reset: activation.needs_reset,
                handler,
            };
            state.run(&epoll, &stop);
        })?;
        Ok(IoThread { _thread: thread })
    }
}

const STOP_TOKEN: u64 = u64::MAX;

impl StopSignal {
    /// A stop that is never requested, for serving queues on the calling
    /// thread.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn never() -> io::Result<StopSignal> {
        Ok(StopSignal {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// Serves each enabled queue of `activation` once with `handler`, on the
/// calling thread, as the I/O thread would after a notification of each;
/// whether the device then needs a reset.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn serve_each_queue_once(
    activation: Activation,
    handler: impl RequestHandler,
) -> io::Result<bool> {
    let stop = StopSignal::never()?;
    let mut state = Served {
        memory: activation.memory,
        queues: activation.queues,
        interrupt: activation.interrupt,
        needs_reset: activation.needs_reset,
        handler,
    };
    for index in 0..state.queues.len() {
        state.serve(index, &stop);
    }
    Ok(state.needs_reset.load(Ordering::SeqCst))
}

struct Served<H> {
    memory: GuestRam,
    queues: Vec<Option<ActiveQueue>>,
    interrupt: Arc<Interrupt>,
    needs_reset: Arc<AtomicBool>,
    handler: H,
}

impl<H: RequestHandler> Served<H> {
    fn run(&mut self, epoll: &Epoll, stop: &StopSignal) {
        // Requests queued before DRIVER_OK (a driver may) are served now.
        for index in 0..self.queues.len() {
            self.serve(index, stop);
        }
        let mut events = vec![EpollEvent::default(); self.queues.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio I/O thread: waiting for notifications: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == STOP_TOKEN || stop.requested() {
                    return;
                }
                let index = token as usize;
                if let Some(Some(q)) = self.queues.get(index) {
                    // Consume the notification; serving drains the queue.
                    let _ = q.notify.read();
                }
                self.serve(index, stop);
            }
        }
    }

    /// Takes every available chain of queue `index`, hands it to the
    /// handler and returns it used, then interrupts the driver if it asked.
    fn serve(&mut self, index: usize, stop: &StopSignal) {
        if self.needs_reset.load(Ordering::SeqCst) {
            return;
        }
        let Some(Some(active)) = self.queues.get_mut(index) else {
            return;
        };
        let memory = &self.memory;
        let result = serve_queue(&mut active.queue, memory, stop, |chain| {
            self.handler.handle(index, memory, chain)
        });
        match result {
            Ok(true) => {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    tracing::error!("virtio: raising the queue interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                // The driver broke the queue (rings outside RAM, a
                // runaway available index, a chain without room for a
                // status): stop serving the device until it resets it.
                tracing::warn!("virtio queue {index}: {e}; the device needs a reset");
                self.needs_reset.store(true, Ordering::SeqCst);
                let _ = self.interrupt.signal_config_change();
            }
        }
    }
}

/// Serves every available chain of `queue` (until a stop is requested);
/// whether the driver wants an interrupt for the chains returned.
fn serve_queue(
    queue: &mut Queue,
    memory: &GuestRam,
    stop: &StopSignal,
    mut handle: impl FnMut(DescriptorChain<&GuestRam>) -> Result<u32, RequestError>,
) -> Result<bool, RequestError> {
    let bad = |what: &str, e: virtio_queue::Error| RequestError(format!("{what}: {e}"));
    let mut returned = 0usize;
    loop {
        queue
            .disable_notification(memory)
            .map_err(|e| bad("disabling notifications", e))?;
        loop {
            if stop.requested() {
                return Ok(false);
            }
            let chain = {
                let mut available = queue
                    .iter(memory)
                    .map_err(|e| bad("reading the available ring", e))?;
                available.next()
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let used = handle(chain)?;
            queue
                .add_used(memory, head, used)
                .map_err(|e| bad("returning a used buffer", e))?;
            returned += 1;
        }
        // Re-enable notifications, then look again: a chain made
        // available in between would otherwise wait for the next kick.
        if !queue
            .enable_notification(memory)
            .map_err(|e| bad("enabling notifications", e))?
        {
            break;
        }
    }
    if returned == 0 {
        return Ok(false);
    }
    queue
        .needs_notification(memory)
        .map_err(|e| bad("reading the used event", e))
}
