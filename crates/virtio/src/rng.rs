//! virtio-rng (virtio 1.2, section 5.4): one queue of buffers the device
//! fills with entropy from the host kernel's random source.

use std::fs::File;
use std::io::{Read, Write};

use ram::GuestRam;
use virtio_queue::{DescriptorChain, Writer};

use crate::device::{Activation, VirtioDevice, COMMON_FEATURES};
use crate::worker::{IoThread, RequestError, RequestHandler};

const QUEUE_SIZE: u16 = 64;
/// Bytes one request gets at most, however large its buffers.
const MAX_REQUEST: usize = 64 << 10;

/// One entropy device.
pub struct Rng {
    queue_sizes: [u16; 1],
    thread: Option<IoThread>,
    name: String,
}

impl Rng {
    pub fn new(name: &str) -> Rng {
        Rng {
            queue_sizes: [QUEUE_SIZE],
            thread: None,
            name: name.to_owned(),
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn activate(&mut self, activation: Activation) -> std::io::Result<()> {
        // getrandom(2)'s pool through its character device: never blocks
        // once the host is booted, and needs no unsafe code here.
        let source = File::open("/dev/urandom")?;
        let handler = Entropy {
            source,
            buffer: vec![0; MAX_REQUEST],
        };
        self.thread = Some(IoThread::spawn(self.name.clone(), activation, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.thread = None;
    }
}

struct Entropy {
    source: File,
    buffer: Vec<u8>,
}

impl RequestHandler for Entropy {
    fn handle(
        &mut self,
        _queue: usize,
        memory: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
    ) -> Result<u32, RequestError> {
        let mut writer = Writer::new(memory, chain)
            .map_err(|e| RequestError(format!("entropy request: {e}")))?;
        let n = writer.available_bytes().min(MAX_REQUEST);
        self.source
            .read_exact(&mut self.buffer[..n])
            .map_err(|e| RequestError(format!("reading host entropy: {e}")))?;
        writer
            .write_all(&self.buffer[..n])
            .map_err(|e| RequestError(format!("writing entropy to guest memory: {e}")))?;
        Ok(n as u32)
    }
}
