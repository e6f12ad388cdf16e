//! The fixture programs the integration tests of this crate look at: each
//! one's probe plan and bytes, in both build profiles.

use crate::support::{self, Profile};
use tracer_probes::{ProbePlan, discover};

const FIXTURES: [&str; 2] = ["multi_worker", "current_thread"];

/// A fixture's plan and the file it came from.
pub struct Fixture {
    pub name: &'static str,
    pub profile: Profile,
    pub plan: ProbePlan,
    pub data: Vec<u8>,
}

impl Fixture {
    pub fn label(&self) -> String {
        format!("{} ({:?})", self.name, self.profile)
    }
}

/// Every fixture in every profile, discovered.
pub fn fixtures() -> Vec<Fixture> {
    let mut all = Vec::new();
    for name in FIXTURES {
        for profile in Profile::ALL {
            let path = support::fixture(name, profile);
            let plan = discover(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            all.push(Fixture {
                name,
                profile,
                plan,
                data: std::fs::read(&path).unwrap(),
            });
        }
    }
    all
}
