//! Guest-side network benchmark for bench/net.sh: sends MIB MiB to a host
//! port in 128 KiB writes (as iperf3 does), or takes one connection on a
//! port and reads it to the end in 128 KiB reads. The host times both
//! ends. Built static by the script (std only:
//! `rustc -O -C target-feature=+crt-static`).
//!
//!   netbench send ADDRESS:PORT MIB
//!   netbench recv PORT

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

const CHUNK: usize = 128 << 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: netbench send ADDRESS:PORT MIB | netbench recv PORT");
        std::process::exit(2);
    };
    match args.get(1).map(String::as_str) {
        Some("send") if args.len() == 4 => {
            let mib: usize = args[3].parse().unwrap_or_else(|_| usage());
            let mut s = TcpStream::connect(&args[2]).expect("connecting to the host");
            let block = vec![0x5au8; CHUNK];
            let mut left = mib << 20;
            while left > 0 {
                let n = left.min(CHUNK);
                s.write_all(&block[..n]).expect("sending");
                left -= n;
            }
            s.shutdown(Shutdown::Write).expect("shutting down");
            // The host closes once it has counted everything.
            let _ = s.read(&mut [0u8; 16]);
        }
        Some("recv") if args.len() == 3 => {
            let port: u16 = args[2].parse().unwrap_or_else(|_| usage());
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("listening");
            let (mut s, _) = listener.accept().expect("accepting");
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                match s.read(&mut buf).expect("receiving") {
                    0 => break,
                    n => got += n as u64,
                }
            }
            println!("netbench received {got} bytes");
        }
        _ => usage(),
    }
}
