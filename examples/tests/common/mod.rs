//! Helpers shared by the process tests: a child process whose stderr is
//! read line by line as it comes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// A running process whose stderr lines are collected as they come.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn start_bin(bin: &str, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.current_dir(std::env::temp_dir());
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.to_string(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a topology process listens for task workers; returns
    /// its `host:port`.
    pub fn listening_addr(&mut self) -> String {
        const SAYS: &str = "Listening for task workers on ";
        let line = self.wait_for(SAYS);
        line.split(SAYS)
            .nth(1)
            .unwrap()
            .split([' ', ';'])
            .next()
            .unwrap()
            .to_string()
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_all(&[needle]).remove(0)
    }

    /// Waits until each needle has been in a stderr line, in any order;
    /// returns the first line with each.
    pub fn wait_for_all(&mut self, needles: &[&str]) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    for (needle, slot) in needles.iter().zip(&mut found) {
                        if slot.is_none() && line.contains(needle) {
                            *slot = Some(line.clone());
                        }
                    }
                    self.seen.push(line);
                    if found.iter().all(Option::is_some) {
                        return found.into_iter().flatten().collect();
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "{} never said all of {needles:?}; it said:\n{}",
            self.name,
            self.seen.join("\n")
        );
    }

    /// Waits for the process to exit; returns its code and stdout.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out).unwrap();
        }
        let status = self.child.wait().unwrap();
        (status.code(), out)
    }

    /// Waits (at most `within`) for the process to exit, collecting its
    /// stderr lines; returns its code and stdout.
    pub fn exit_within(mut self, within: Duration) -> (Option<i32>, String, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if left.is_zero() {
                        panic!(
                            "{} did not exit within {within:?}; it said:\n{}",
                            self.name,
                            self.seen.join("\n")
                        );
                    }
                }
            }
        }
        let seen = std::mem::take(&mut self.seen);
        let (code, out) = self.finish();
        (code, out, seen)
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    pub fn kill_9(&mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success());
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
