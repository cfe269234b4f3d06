//! Short codes ("7-guitarist-revenge"): a nameplate the rendezvous server allocates, then
//! words from the PGP word list that only the two peers know.
//!
//! The nameplate names the session ([`session_name`]: `code-7`); the whole code, normalized
//! ([`Code`]'s `Display`), is the session secret, i.e. the SPAKE2 password. The server sees
//! the nameplate and never the words. With one online guess per code (a failed key
//! confirmation burns the nameplate), two words (16 bits) leave a guesser a 1 in 65536
//! chance; `--code-words N` makes it longer.
//!
//! Words alternate between the list's two halves, as the PGP word list does: the first word
//! (and every other one after it) from the three-syllable half, the second (and so on) from
//! the two-syllable half, so a swapped or repeated word is noticed.

use std::fmt;

use rand::Rng;

/// Sessions whose name starts with this are code sessions (`code-7`); the server reserves
/// the prefix: such a session exists only for an allocated nameplate.
pub const SESSION_PREFIX: &str = "code-";

/// Longest code text accepted, in bytes (untrusted input is bounded before it is looked at).
pub const MAX_CODE_LEN: usize = 200;

/// Most words a code may have.
pub const MAX_WORDS: usize = 8;

/// Words a code has unless asked otherwise (`--code-words`).
pub const DEFAULT_WORDS: usize = 2;

/// Largest nameplate a code may name (the server hands out the smallest free one; a bigger
/// number is a typo).
pub const MAX_NAMEPLATE: u32 = 9_999_999;

/// The session name for `nameplate`.
pub fn session_name(nameplate: u32) -> String {
    format!("{SESSION_PREFIX}{nameplate}")
}

/// Whether `session` is in the code namespace (starts with [`SESSION_PREFIX`]).
pub fn is_code_session(session: &str) -> bool {
    session.starts_with(SESSION_PREFIX)
}

/// The nameplate of a code session's name, exactly as [`session_name`] writes it (no sign,
/// no leading zero, 1 to [`MAX_NAMEPLATE`]); `None` for anything else.
pub fn nameplate_of(session: &str) -> Option<u32> {
    let digits = session.strip_prefix(SESSION_PREFIX)?;
    if digits.is_empty()
        || digits.len() > 7
        || digits.starts_with('0')
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    digits
        .parse()
        .ok()
        .filter(|n| (1..=MAX_NAMEPLATE).contains(n))
}

/// The session and secret two peers that linked once with a code use to link again (`expose`
/// and `forward` rejoin after a link ends): derived from the code's session and secret, so
/// only those two know them, and outside the code namespace (the nameplate was used once and
/// is free again). A 256-bit secret: no guess limit is needed there.
pub fn rejoin_params(code_session: &str, code_secret: &str) -> (String, String) {
    let key = crate::handshake::LinkKey::derive(code_session, code_secret);
    let name = key.derive_labeled("nettool code rejoin session", b"");
    let secret = key.derive_labeled("nettool code rejoin secret", b"");
    (
        format!("coded-{}", hex::encode(&name[..16])),
        hex::encode(secret),
    )
}

/// The list a code's word at `position` (0 = first word) comes from.
fn list_for(position: usize) -> &'static [&'static str; 256] {
    if position.is_multiple_of(2) {
        &ODD_WORDS
    } else {
        &EVEN_WORDS
    }
}

/// A short code: a nameplate and words.
#[derive(Clone, PartialEq, Eq)]
pub struct Code {
    nameplate: u32,
    words: Vec<&'static str>,
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The words are the secret: keep them out of logs.
        f.debug_struct("Code")
            .field("nameplate", &self.nameplate)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Code {
    /// The normalized form, `7-guitarist-revenge`: what the other side types, and the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.nameplate)?;
        for w in &self.words {
            write!(f, "-{w}")?;
        }
        Ok(())
    }
}

impl Code {
    /// A new code for `nameplate` with `words` words (1 to [`MAX_WORDS`]), each drawn
    /// uniformly from its list with `rng` (a CSPRNG: the words are the secret).
    pub fn generate<R: rand::RngCore + rand::CryptoRng>(
        nameplate: u32,
        words: usize,
        rng: &mut R,
    ) -> Result<Self, CodeError> {
        if !(1..=MAX_WORDS).contains(&words) {
            return Err(CodeError::WordCount(words));
        }
        let words = (0..words)
            .map(|i| list_for(i)[rng.gen_range(0..256usize)])
            .collect();
        Ok(Self { nameplate, words })
    }

    /// Reads a code as a person typed it: case does not matter, and spaces (or several
    /// dashes) may stand for a dash. The nameplate first, then 1 to [`MAX_WORDS`] words from
    /// the list; an error names what is wrong (the word, and where it belongs).
    pub fn parse(text: &str) -> Result<Self, CodeError> {
        if text.len() > MAX_CODE_LEN {
            return Err(CodeError::TooLong);
        }
        let lower = text.to_ascii_lowercase();
        let mut parts = lower
            .split(|c: char| c == '-' || c.is_whitespace())
            .filter(|p| !p.is_empty());
        let number = parts.next().ok_or(CodeError::Empty)?;
        let nameplate = nameplate_of(&format!("{SESSION_PREFIX}{number}"))
            .ok_or_else(|| CodeError::Nameplate(number.to_owned()))?;
        let mut words = Vec::new();
        for (i, part) in parts.enumerate() {
            if i >= MAX_WORDS {
                return Err(CodeError::WordCount(i + 1));
            }
            let list = list_for(i);
            match list.iter().find(|w| **w == part) {
                Some(w) => words.push(*w),
                None => {
                    let other = list_for(i + 1).contains(&part);
                    return Err(CodeError::Word {
                        word: part.to_owned(),
                        position: i + 1,
                        other_half: other,
                    });
                }
            }
        }
        if words.is_empty() {
            return Err(CodeError::WordCount(0));
        }
        Ok(Self { nameplate, words })
    }

    /// The nameplate (the number the server allocated).
    pub fn nameplate(&self) -> u32 {
        self.nameplate
    }

    /// The number of words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// The session this code names (`code-7`).
    pub fn session(&self) -> String {
        session_name(self.nameplate)
    }

    /// The session secret: the whole code, normalized.
    pub fn secret(&self) -> String {
        self.to_string()
    }
}

/// Why a code was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// Nothing was given.
    #[error("empty code: expected a number and words, like 7-guitarist-revenge")]
    Empty,
    /// The text is longer than any code.
    #[error("code too long (at most {MAX_CODE_LEN} characters)")]
    TooLong,
    /// The first part is not a nameplate number.
    #[error(
        "bad code: '{0}' is not a nameplate number (a code starts with the number, \
         like 7-guitarist-revenge)"
    )]
    Nameplate(String),
    /// Too few or too many words.
    #[error("bad code: {0} words; a code has 1 to {MAX_WORDS} words after the number")]
    WordCount(usize),
    /// A word is not in the list (for its position).
    #[error(
        "bad code: word {position} '{word}' is not in the code word list{}",
        if *other_half { " at this position (words alternate between the list's halves: \
                           check the order)" } else { " (check the spelling)" }
    )]
    Word {
        /// The word as typed (lower case).
        word: String,
        /// Its position among the words, from 1.
        position: usize,
        /// It is in the list, but in the half for the other positions (swapped words).
        other_half: bool,
    },
}

/// The PGP word list's three-syllable half ("odd" words), in its order: words at even
/// positions of a code (the first, third, ...) come from here.
pub const ODD_WORDS: [&str; 256] = [
    "adroitness",
    "adviser",
    "aftermath",
    "aggregate",
    "alkali",
    "almighty",
    "amulet",
    "amusement",
    "antenna",
    "applicant",
    "apollo",
    "armistice",
    "article",
    "asteroid",
    "atlantic",
    "atmosphere",
    "autopsy",
    "babylon",
    "backwater",
    "barbecue",
    "belowground",
    "bifocals",
    "bodyguard",
    "bookseller",
    "borderline",
    "bottomless",
    "bradbury",
    "bravado",
    "brazilian",
    "breakaway",
    "burlington",
    "businessman",
    "butterfat",
    "camelot",
    "candidate",
    "cannonball",
    "capricorn",
    "caravan",
    "caretaker",
    "celebrate",
    "cellulose",
    "certify",
    "chambermaid",
    "cherokee",
    "chicago",
    "clergyman",
    "coherence",
    "combustion",
    "commando",
    "company",
    "component",
    "concurrent",
    "confidence",
    "conformist",
    "congregate",
    "consensus",
    "consulting",
    "corporate",
    "corrosion",
    "councilman",
    "crossover",
    "crucifix",
    "cumbersome",
    "customer",
    "dakota",
    "decadence",
    "december",
    "decimal",
    "designing",
    "detector",
    "detergent",
    "determine",
    "dictator",
    "dinosaur",
    "direction",
    "disable",
    "disbelief",
    "disruptive",
    "distortion",
    "document",
    "embezzle",
    "enchanting",
    "enrollment",
    "enterprise",
    "equation",
    "equipment",
    "escapade",
    "eskimo",
    "everyday",
    "examine",
    "existence",
    "exodus",
    "fascinate",
    "filament",
    "finicky",
    "forever",
    "fortitude",
    "frequency",
    "gadgetry",
    "galveston",
    "getaway",
    "glossary",
    "gossamer",
    "graduate",
    "gravity",
    "guitarist",
    "hamburger",
    "hamilton",
    "handiwork",
    "hazardous",
    "headwaters",
    "hemisphere",
    "hesitate",
    "hideaway",
    "holiness",
    "hurricane",
    "hydraulic",
    "impartial",
    "impetus",
    "inception",
    "indigo",
    "inertia",
    "infancy",
    "inferno",
    "informant",
    "insincere",
    "insurgent",
    "integrate",
    "intention",
    "inventive",
    "istanbul",
    "jamaica",
    "jupiter",
    "leprosy",
    "letterhead",
    "liberty",
    "maritime",
    "matchmaker",
    "maverick",
    "medusa",
    "megaton",
    "microscope",
    "microwave",
    "midsummer",
    "millionaire",
    "miracle",
    "misnomer",
    "molasses",
    "molecule",
    "montana",
    "monument",
    "mosquito",
    "narrative",
    "nebula",
    "newsletter",
    "norwegian",
    "october",
    "ohio",
    "onlooker",
    "opulent",
    "orlando",
    "outfielder",
    "pacific",
    "pandemic",
    "pandora",
    "paperweight",
    "paragon",
    "paragraph",
    "paramount",
    "passenger",
    "pedigree",
    "pegasus",
    "penetrate",
    "perceptive",
    "performance",
    "pharmacy",
    "phonetic",
    "photograph",
    "pioneer",
    "pocketful",
    "politeness",
    "positive",
    "potato",
    "processor",
    "provincial",
    "proximate",
    "puberty",
    "publisher",
    "pyramid",
    "quantity",
    "racketeer",
    "rebellion",
    "recipe",
    "recover",
    "repellent",
    "replica",
    "reproduce",
    "resistor",
    "responsive",
    "retraction",
    "retrieval",
    "retrospect",
    "revenue",
    "revival",
    "revolver",
    "sandalwood",
    "sardonic",
    "saturday",
    "savagery",
    "scavenger",
    "sensation",
    "sociable",
    "souvenir",
    "specialist",
    "speculate",
    "stethoscope",
    "stupendous",
    "supportive",
    "surrender",
    "suspicious",
    "sympathy",
    "tambourine",
    "telephone",
    "therapist",
    "tobacco",
    "tolerance",
    "tomorrow",
    "torpedo",
    "tradition",
    "travesty",
    "trombonist",
    "truncated",
    "typewriter",
    "ultimate",
    "undaunted",
    "underfoot",
    "unicorn",
    "unify",
    "universe",
    "unravel",
    "upcoming",
    "vacancy",
    "vagabond",
    "vertigo",
    "virginia",
    "visitor",
    "vocalist",
    "voyager",
    "warranty",
    "waterloo",
    "whimsical",
    "wichita",
    "wilmington",
    "wyoming",
    "yesteryear",
    "yucatan",
];

/// The PGP word list's two-syllable half ("even" words), in its order: words at odd
/// positions of a code (the second, fourth, ...) come from here.
pub const EVEN_WORDS: [&str; 256] = [
    "aardvark",
    "absurd",
    "accrue",
    "acme",
    "adrift",
    "adult",
    "afflict",
    "ahead",
    "aimless",
    "algol",
    "allow",
    "alone",
    "ammo",
    "ancient",
    "apple",
    "artist",
    "assume",
    "athens",
    "atlas",
    "aztec",
    "baboon",
    "backfield",
    "backward",
    "banjo",
    "beaming",
    "bedlamp",
    "beehive",
    "beeswax",
    "befriend",
    "belfast",
    "berserk",
    "billiard",
    "bison",
    "blackjack",
    "blockade",
    "blowtorch",
    "bluebird",
    "bombast",
    "bookshelf",
    "brackish",
    "breadline",
    "breakup",
    "brickyard",
    "briefcase",
    "burbank",
    "button",
    "buzzard",
    "cement",
    "chairlift",
    "chatter",
    "checkup",
    "chisel",
    "choking",
    "chopper",
    "christmas",
    "clamshell",
    "classic",
    "classroom",
    "cleanup",
    "clockwork",
    "cobra",
    "commence",
    "concert",
    "cowbell",
    "crackdown",
    "cranky",
    "crowfoot",
    "crucial",
    "crumpled",
    "crusade",
    "cubic",
    "dashboard",
    "deadbolt",
    "deckhand",
    "dogsled",
    "dragnet",
    "drainage",
    "dreadful",
    "drifter",
    "dropper",
    "drumbeat",
    "drunken",
    "dupont",
    "dwelling",
    "eating",
    "edict",
    "egghead",
    "eightball",
    "endorse",
    "endow",
    "enlist",
    "erase",
    "escape",
    "exceed",
    "eyeglass",
    "eyetooth",
    "facial",
    "fallout",
    "flagpole",
    "flatfoot",
    "flytrap",
    "fracture",
    "framework",
    "freedom",
    "frighten",
    "gazelle",
    "geiger",
    "glitter",
    "glucose",
    "goggles",
    "goldfish",
    "gremlin",
    "guidance",
    "hamlet",
    "highchair",
    "hockey",
    "indoors",
    "indulge",
    "inverse",
    "involve",
    "island",
    "jawbone",
    "keyboard",
    "kickoff",
    "kiwi",
    "klaxon",
    "locale",
    "lockup",
    "merit",
    "minnow",
    "miser",
    "mohawk",
    "mural",
    "music",
    "necklace",
    "neptune",
    "newborn",
    "nightbird",
    "oakland",
    "obtuse",
    "offload",
    "optic",
    "orca",
    "payday",
    "peachy",
    "pheasant",
    "physique",
    "playhouse",
    "pluto",
    "preclude",
    "prefer",
    "preshrunk",
    "printer",
    "prowler",
    "pupil",
    "puppy",
    "python",
    "quadrant",
    "quiver",
    "quota",
    "ragtime",
    "ratchet",
    "rebirth",
    "reform",
    "regain",
    "reindeer",
    "rematch",
    "repay",
    "retouch",
    "revenge",
    "reward",
    "rhythm",
    "ribcage",
    "ringbolt",
    "robust",
    "rocker",
    "ruffled",
    "sailboat",
    "sawdust",
    "scallion",
    "scenic",
    "scorecard",
    "scotland",
    "seabird",
    "select",
    "sentence",
    "shadow",
    "shamrock",
    "showgirl",
    "skullcap",
    "skydive",
    "slingshot",
    "slowdown",
    "snapline",
    "snapshot",
    "snowcap",
    "snowslide",
    "solo",
    "southward",
    "soybean",
    "spaniel",
    "spearhead",
    "spellbind",
    "spheroid",
    "spigot",
    "spindle",
    "spyglass",
    "stagehand",
    "stagnate",
    "stairway",
    "standard",
    "stapler",
    "steamship",
    "sterling",
    "stockman",
    "stopwatch",
    "stormy",
    "sugar",
    "surmount",
    "suspense",
    "sweatband",
    "swelter",
    "tactics",
    "talon",
    "tapeworm",
    "tempest",
    "tiger",
    "tissue",
    "tonic",
    "topmost",
    "tracker",
    "transit",
    "trauma",
    "treadmill",
    "trojan",
    "trouble",
    "tumor",
    "tunnel",
    "tycoon",
    "uncut",
    "unearth",
    "unwind",
    "uproot",
    "upset",
    "upshot",
    "vapor",
    "village",
    "virus",
    "vulcan",
    "waffle",
    "wallet",
    "watchword",
    "wayside",
    "willow",
    "woodlark",
    "zulu",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_are_the_pgp_word_list_without_duplicates() {
        let mut all: Vec<&str> = ODD_WORDS.iter().chain(EVEN_WORDS.iter()).copied().collect();
        assert_eq!(all.len(), 512);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 512, "a word appears twice");
        assert!(all
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())));
        // Spot checks against the published list (byte 0x00 and 0xFF of each half).
        assert_eq!((ODD_WORDS[0], ODD_WORDS[255]), ("adroitness", "yucatan"));
        assert_eq!((EVEN_WORDS[0], EVEN_WORDS[255]), ("aardvark", "zulu"));
        assert_eq!(
            (ODD_WORDS[0x69], EVEN_WORDS[0xa9]),
            ("guitarist", "revenge")
        );
    }

    #[test]
    fn a_code_reads_back_as_written_whatever_the_case_and_separators() {
        let code = Code::parse("7-guitarist-revenge").unwrap();
        assert_eq!(code.nameplate(), 7);
        assert_eq!(code.to_string(), "7-guitarist-revenge");
        assert_eq!(code.session(), "code-7");
        assert_eq!(code.secret(), "7-guitarist-revenge");
        for typed in [
            "7 Guitarist REVENGE",
            "  7--guitarist - revenge\n",
            "7\tguitarist revenge",
        ] {
            assert_eq!(Code::parse(typed).unwrap(), code, "{typed:?}");
        }
    }

    #[test]
    fn bad_codes_are_refused_with_the_reason() {
        let err = |s: &str| Code::parse(s).unwrap_err().to_string();
        assert!(err("").contains("empty code"));
        assert!(err("   - ").contains("empty code"));
        assert!(err("guitarist-revenge").contains("'guitarist' is not a nameplate number"));
        assert!(err("0-guitarist-revenge").contains("not a nameplate number"));
        assert!(err("07-guitarist-revenge").contains("not a nameplate number"));
        assert!(err("99999999-guitarist-revenge").contains("not a nameplate number"));
        assert!(err("+7-guitarist-revenge").contains("not a nameplate number"));
        assert!(err("7").contains("0 words"));
        let e = err("7-guitarist-revenj");
        assert!(
            e.contains("word 2 'revenj'") && e.contains("spelling"),
            "{e}"
        );
        let e = err("7-revenge-guitarist");
        assert!(e.contains("word 1 'revenge'") && e.contains("order"), "{e}");
        let nine = "7-adroitness-aardvark-adroitness-aardvark-adroitness-aardvark-adroitness-aardvark-adroitness";
        assert!(err(nine).contains("9 words"));
        assert!(err(&"7-".repeat(10_000)).contains("too long"));
        assert!(err(&format!("7-{}", "a".repeat(MAX_CODE_LEN))).contains("too long"));
    }

    #[test]
    fn generated_codes_parse_back_and_use_both_halves() {
        let mut rng = rand::rngs::OsRng;
        for n in 1..=MAX_WORDS {
            let code = Code::generate(12, n, &mut rng).unwrap();
            assert_eq!(code.word_count(), n);
            assert_eq!(Code::parse(&code.to_string()).unwrap(), code);
        }
        assert!(Code::generate(1, 0, &mut rng).is_err());
        assert!(Code::generate(1, MAX_WORDS + 1, &mut rng).is_err());
        // Words are drawn from the whole list: 2000 draws from 256 see most of it.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            seen.insert(Code::generate(1, 1, &mut rng).unwrap().words[0]);
        }
        assert!(seen.len() > 240, "only {} distinct words", seen.len());
        // The words stay out of Debug output.
        let code = Code::parse("7-guitarist-revenge").unwrap();
        assert!(!format!("{code:?}").contains("guitarist"));
    }

    #[test]
    fn rejoin_params_are_derived_from_the_whole_code() {
        let (s, k) = rejoin_params("code-7", "7-guitarist-revenge");
        assert_eq!(
            (s.clone(), k.clone()),
            rejoin_params("code-7", "7-guitarist-revenge")
        );
        assert!(s.starts_with("coded-") && !is_code_session(&s), "{s}");
        assert!(!s.contains("guitarist") && !k.contains("guitarist"));
        assert_ne!(rejoin_params("code-7", "7-guitarist-aardvark").0, s);
        assert_eq!(k.len(), 64);
    }

    #[test]
    fn session_names_map_to_nameplates_exactly() {
        assert_eq!(nameplate_of(&session_name(7)), Some(7));
        assert_eq!(nameplate_of("code-1234567"), Some(1234567));
        for bad in [
            "code-",
            "code-0",
            "code-07",
            "code-x",
            "code-12345678",
            "demo",
            "code--1",
        ] {
            assert_eq!(nameplate_of(bad), None, "{bad}");
        }
        assert!(is_code_session("code-x"));
        assert!(!is_code_session("demo"));
    }
}
