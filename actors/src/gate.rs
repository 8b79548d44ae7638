//! The gate between opening the image file and the resource's role: a Secondary's image refuses
//! opening for writing, and a node cannot become Secondary while its image is open for writing
//! (as DRBD refuses to demote a device that is held open).
//!
//! The FUSE front end and the resource supervisor share it; each decision takes one short lock
//! so that an open and a demotion can never both succeed.

use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenRefused {
    #[error("the image is read-only because this node is not Primary")]
    NotPrimary,
    #[error("the resource is going down")]
    GoingDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateRefused {
    #[error("the image is held open for writing ({writers} open handle(s)); close it first (umount, losetup -d)")]
    HeldOpenForWriting { writers: u32 },
    #[error(
        "the image is held open ({handles} open handle(s)); close it first (umount, losetup -d)"
    )]
    HeldOpen { handles: u32 },
}

#[derive(Debug, Default)]
struct GateState {
    primary: bool,
    going_down: bool,
    writers: u32,
    readers: u32,
}

/// Open counts and the write permission of one image.
#[derive(Debug, Default)]
pub struct ImageGate {
    state: Mutex<GateState>,
}

/// Open handle counts, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenCounts {
    pub writers: u32,
    pub readers: u32,
}

impl ImageGate {
    pub fn new(primary: bool) -> Self {
        ImageGate {
            state: Mutex::new(GateState {
                primary,
                ..GateState::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an open handle; writers need the Primary role.
    pub fn open(&self, for_writing: bool) -> Result<(), OpenRefused> {
        let mut state = self.lock();
        if state.going_down {
            return Err(OpenRefused::GoingDown);
        }
        if for_writing {
            if !state.primary {
                return Err(OpenRefused::NotPrimary);
            }
            state.writers += 1;
        } else {
            state.readers += 1;
        }
        Ok(())
    }

    pub fn release(&self, for_writing: bool) {
        let mut state = self.lock();
        if for_writing {
            state.writers = state.writers.saturating_sub(1);
        } else {
            state.readers = state.readers.saturating_sub(1);
        }
    }

    pub fn open_counts(&self) -> OpenCounts {
        let state = self.lock();
        OpenCounts {
            writers: state.writers,
            readers: state.readers,
        }
    }

    pub fn set_primary(&self) {
        self.lock().primary = true;
    }

    /// Withdraws the write permission unless a writer holds the image open.
    pub fn try_set_secondary(&self) -> Result<(), GateRefused> {
        let mut state = self.lock();
        if state.writers > 0 {
            return Err(GateRefused::HeldOpenForWriting {
                writers: state.writers,
            });
        }
        state.primary = false;
        Ok(())
    }

    /// Refuses every new open from now on, unless something holds the image open.
    pub fn try_close(&self) -> Result<(), GateRefused> {
        let mut state = self.lock();
        let handles = state.writers + state.readers;
        if handles > 0 {
            return Err(GateRefused::HeldOpen { handles });
        }
        state.going_down = true;
        Ok(())
    }

    /// Refuses every new open from now on, whatever is open (daemon shutdown).
    pub fn close_anyway(&self) {
        self.lock().going_down = true;
    }

    /// Undoes a close after a failed shutdown step.
    pub fn reopen(&self) {
        self.lock().going_down = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secondary_refuses_writers_but_not_readers() {
        let gate = ImageGate::new(false);
        assert_eq!(gate.open(true), Err(OpenRefused::NotPrimary));
        assert_eq!(gate.open(false), Ok(()));
        gate.set_primary();
        assert_eq!(gate.open(true), Ok(()));
        assert_eq!(
            gate.open_counts(),
            OpenCounts {
                writers: 1,
                readers: 1
            }
        );
    }

    #[test]
    fn demotion_waits_for_writers_to_close() {
        let gate = ImageGate::new(true);
        assert_eq!(gate.open(true), Ok(()));
        assert_eq!(
            gate.try_set_secondary(),
            Err(GateRefused::HeldOpenForWriting { writers: 1 })
        );
        gate.release(true);
        assert_eq!(gate.try_set_secondary(), Ok(()));
        assert_eq!(gate.open(true), Err(OpenRefused::NotPrimary));
    }

    #[test]
    fn closing_refuses_new_opens() {
        let gate = ImageGate::new(true);
        assert_eq!(gate.open(false), Ok(()));
        assert_eq!(gate.try_close(), Err(GateRefused::HeldOpen { handles: 1 }));
        gate.release(false);
        assert_eq!(gate.try_close(), Ok(()));
        assert_eq!(gate.open(false), Err(OpenRefused::GoingDown));
    }
}
