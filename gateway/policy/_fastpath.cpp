// Kanmon policy engine: the native fast path of one HTTP decision (issue #4).
//
// Why native code and not a library or more Python: bench/engine.py measured ~10 us per
// decision in the tuned Python engine against ~3.9 us for adblock-rust, and the profile
// split it into building the query (~2 us), the RE2 set match through its Python binding
// (1-2 us) and the Python loop over the candidate rules (3-4 us). None of that is a
// missing algorithm — the tables, the sets and the loop are already the right ones — it is
// interpreter overhead, so the same procedure is done here in C++ on the same tables.
// No existing library decides Kanmon's rule language (first match in document order with
// per-device dead rules), so this file is the engine's loop, not a wrapper.
//
// The contract (gateway/policy/snapshot.py, PolicySnapshot.decide_url): Engine.decide_url
// takes decide_url's arguments (URL string, device, stage, method, clock) and returns the
// very Verdict object the Python engine returns; whenever anything is outside what this
// file evaluates it calls the Python decide_url with the arguments as given (decide() is
// the same test returning None instead). Nothing is guessed, so results are the Python
// engine's by construction — with one caveat: the regexes left to RE2 here run on the
// system's libre2 (Debian's 2022-06-01), the Python engine on the RE2 bundled with the
// google-re2 wheel; the differential tests hold them equal on the project's policies.
// What is evaluated here:
//   - URLs in the simple form (ASCII, no '@', '[' or '%' in the authority, a numeric port,
//     no trailing dot or blanks on the host); '%'-escapes in the path are normalized the
//     way normalize_url does;
//   - the stages http-request and http-response, without extra query fields;
//   - rules whose conditions are: the host tables (domain / domain_exact / list), URL
//     pattern membership in one of the two URL sets, and device conditions that the
//     per-device view has settled (dead or certainly true); an expiry instant.
// Everything else (unless:, time windows, methods, content types, destination, ...) sends
// the decision back to Python the moment such a rule is reached.
//
// The host tables (exact and suffix: name -> rule ordinals) are copied into flat
// open-addressing tables: looking names up in the snapshot's Python dicts was the largest
// single cost left on the full benchmark (each probe of a million-entry dict touches its
// index, its entry and the key object: three cache misses, plus a new str per suffix).
// Here a probe touches one 16-byte slot, and the name only when the hash agrees.
//
// URL patterns are not all run through RE2. Measured on the benchmark's 10k patterns, an
// RE2 set (or a DFA per pattern) costs 2-13 us per URL on a host with patterns: every URL
// walks DFA states of its own, each a cache miss. Two kinds of pattern are matched with
// plain string operations instead, with exactly the regex's meaning:
//   - a wildcard tied to a host (`files.test/secret/*`, the KEYED set): the regex is
//     ^scheme://host(:port)?path-glob(?:[?#].*)?$ (urlpattern.py); it can only match a URL
//     whose host is the key (or under it for `*.key`) — the compiler's routing relies on
//     the same fact — so only the patterns filed under the URL's host are tried: the scheme,
//     the port and the path glob compared as ASCII, case-insensitive;
//   - a regex that is a plain literal (`/upload/`, no metacharacter): it matches when the
//     URL contains it. It is found through one of its inner tokens (a run of letters and
//     digits with a separator on each side inside the literal: the URL then has that token
//     whole), then confirmed by a substring search.
// Everything else stays in RE2 sets (of those patterns only). The URL must be printable
// ASCII without blanks for this (RE2's '.' would not match a line break), else Python.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <re2/re2.h>
#include <re2/set.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

bool append_ordinals(PyObject* tuple, std::vector<int>& out);

enum CheckType { CHECK_HOST = 0, CHECK_HOST_OR_FREE = 1, CHECK_URLS = 2 };
enum { FREE_SET = 0, KEYED_SET = 1 };
enum { FLAG_DEAD = 1, FLAG_UNSURE = 2 };
constexpr int STAGES = 2;  // 0: http-request, 1: http-response (what Python maps them to)

struct Check {
    int type;
    int set;                // CHECK_URLS: which RE2 set
    bool residual;          // CHECK_URLS on KEYED_SET: a pattern is left to the RE2 set
    std::vector<int> ids;   // global pattern ids, sorted
};

// A wildcard pattern tied to a host, as parts (all lower-case ASCII).
struct Wildcard {
    bool any_scheme;
    std::string scheme;
    bool any_port;
    std::string port;
    bool empty_path;
    bool query_allowed;                // no '?' in the path: (?:[?#].*)? may follow it
    std::vector<std::string> chunks;   // the path split at '*'
};

struct Rule {
    bool python;            // a condition this file does not evaluate
    bool host_only;
    bool has_expiry;
    int64_t expires_us;     // microseconds since the epoch (UTC)
    std::vector<Check> checks;
};

// Per-decision scratch, reused (the GIL is held for the whole decision and nothing in it
// calls back into Python code that could enter the engine again).
struct Scratch {
    std::string url, host, prefixed, lower;  // lower: the normalized URL in lower case
    size_t scheme_end, host_end, rest;       // offsets in url: "://", end of host, after the port
    std::vector<int> hits, candidates, local, host_patterns;
    bool done[2];
    bool host_patterns_done;
    std::vector<int> matched[2];  // global pattern ids, sorted (FREE: literals and the set)
};

// name -> ints (rule ordinals, pattern ids), read-only once built.
class HostTable {
  public:
    static uint64_t hash(const char* s, size_t n) {
        uint64_t h = std::hash<std::string_view>{}(std::string_view(s, n));
        return h ? h : 1;
    }

    void reserve(size_t n) {
        size_t cap = 16;
        while (cap < n * 2) cap <<= 1;
        slots_.assign(cap, Slot{0, 0, 0});
        mask_ = cap - 1;
    }

    // Files name under a value already stored (value_index) or, with value_index < 0, under
    // a copy of vals; returns the value's index. At most reserve(n) names.
    uint32_t insert(const char* name, size_t len, const int* vals, size_t nvals, long value_index = -1) {
        uint32_t vindex;
        if (value_index < 0) {
            vindex = static_cast<uint32_t>(value_start_.size());
            value_start_.push_back(static_cast<uint32_t>(values_.size()));
            values_.insert(values_.end(), vals, vals + nvals);
            value_end_.push_back(static_cast<uint32_t>(values_.size()));
        } else {
            vindex = static_cast<uint32_t>(value_index);
        }
        uint64_t h = hash(name, len);
        if (names_.size() + len + 4 > UINT32_MAX) throw std::length_error("host table over 4 GiB");
        size_t i = h & mask_;
        while (slots_[i].hash != 0) i = (i + 1) & mask_;
        slots_[i] = Slot{h, static_cast<uint32_t>(names_.size()), vindex};
        uint32_t len32 = static_cast<uint32_t>(len);
        names_.append(reinterpret_cast<const char*>(&len32), sizeof len32);
        names_.append(name, len);
        return vindex;
    }

    // dict[str, tuple[int, ...]]; the same tuple object (the compiler interns them) is stored once.
    bool build(PyObject* dict) {
        reserve(static_cast<size_t>(PyDict_GET_SIZE(dict)));
        std::unordered_map<PyObject*, uint32_t> seen;
        std::vector<int> vals;
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(dict, &pos, &key, &value)) {
            Py_ssize_t len = 0;
            const char* name = PyUnicode_AsUTF8AndSize(key, &len);
            if (!name) return false;
            auto found = seen.find(value);
            if (found != seen.end()) {
                insert(name, static_cast<size_t>(len), nullptr, 0, found->second);
                continue;
            }
            vals.clear();
            if (!append_ordinals(value, vals)) return false;
            seen.emplace(value, insert(name, static_cast<size_t>(len), vals.data(), vals.size()));
        }
        return true;
    }

    bool empty() const { return value_start_.empty(); }

    // Asks the memory for the slot now, so the probes of a host's names overlap.
    void prefetch(uint64_t h) const {
        if (!slots_.empty()) __builtin_prefetch(&slots_[h & mask_]);
    }

    // Appends the ints filed under name (h: its hash).
    void find(const char* name, size_t len, uint64_t h, std::vector<int>& out) const {
        if (slots_.empty()) return;
        for (size_t i = h & mask_;; i = (i + 1) & mask_) {
            const Slot& slot = slots_[i];
            if (slot.hash == 0) return;
            if (slot.hash != h) continue;
            const char* stored = names_.data() + slot.name;
            uint32_t stored_len;
            std::memcpy(&stored_len, stored, sizeof stored_len);
            if (stored_len == len && std::memcmp(stored + sizeof stored_len, name, len) == 0) {
                out.insert(out.end(), values_.begin() + value_start_[slot.value], values_.begin() + value_end_[slot.value]);
                return;
            }
        }
    }

  private:
    struct Slot {
        uint64_t hash;   // 0: empty
        uint32_t name;   // offset in names_: 4-byte length, then the name
        uint32_t value;  // index in value_start_/value_end_
    };
    std::vector<Slot> slots_;
    size_t mask_ = 0;
    std::string names_;
    std::vector<int> values_;
    std::vector<uint32_t> value_start_, value_end_;
};

constexpr size_t TOKEN_BITS = size_t{1} << 20;  // the literal tokens' filter: 128 KiB

struct Engine {
    std::vector<Rule> rules;
    HostTable exact, suffix;
    std::vector<int> url_only;
    std::vector<std::vector<int>> pattern_rules;
    size_t lazy_limit = 16;
    re2::RE2::Options options;
    // The RE2 sets of the patterns matched neither way below (None when there are none).
    std::unique_ptr<re2::RE2::Set> sets[2];
    std::vector<int> set_pids[2];  // entry index in the set -> global pattern id
    // KEYED wildcards by host key (exact / suffix) -> pattern ids, and each one's parts.
    HostTable keyed_exact, keyed_suffix;
    std::vector<std::unique_ptr<Wildcard>> wildcard;
    // FREE literals: inner token (hash) -> pattern ids, with a bit filter in front (most of
    // a URL's tokens are no literal's), and each literal in lower case.
    std::unordered_map<uint64_t, std::vector<int>> token_index;
    std::vector<uint64_t> token_filter;
    std::vector<std::string> literal;
    PyObject* verdicts[STAGES] = {nullptr, nullptr};  // tuple: ordinal -> Verdict
    PyObject* defaults[STAGES] = {nullptr, nullptr};
    Scratch scratch;

    ~Engine() {
        for (int s = 0; s < STAGES; s++) {
            Py_XDECREF(verdicts[s]);
            Py_XDECREF(defaults[s]);
        }
    }
};

struct EngineObject {
    PyObject_HEAD
    Engine* engine;
    // decide_url's Python side: the Stage objects of the native stages, the Python engine's
    // decide_url (anything not decided here), the per-device view factory, the clock
    // conversion (datetime -> microseconds; None when no native rule has an expiry), the
    // snapshot's compile instant, and the last device asked about with its view.
    PyObject* stages[STAGES];
    PyObject* fallback;
    PyObject* view_factory;
    PyObject* micros;
    long long compiled_us;
    PyObject* last_device;
    PyObject* last_view;
};

struct ViewObject {
    PyObject_HEAD
    std::vector<uint8_t>* flags;  // per rule ordinal: FLAG_DEAD / FLAG_UNSURE
    std::vector<int>* generic;     // the device-wide rules this device still has to try
};

PyTypeObject ViewType = {
    PyVarObject_HEAD_INIT(nullptr, 0)
    "gateway.policy._fastpath.View",  // tp_name
    sizeof(ViewObject),               // tp_basicsize
};

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(nullptr, 0)
    "gateway.policy._fastpath.Engine",  // tp_name
    sizeof(EngineObject),               // tp_basicsize
};

// -- conversions ------------------------------------------------------------------------

bool int_list(PyObject* seq, std::vector<int>& out) {
    PyObject* fast = PySequence_Fast(seq, "expected a sequence of ints");
    if (!fast) return false;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    out.clear();
    out.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return false;
        }
        out.push_back(static_cast<int>(v));
    }
    Py_DECREF(fast);
    return true;
}

// Appends the ints of a tuple (a host table value) to out; false on a non-int.
bool append_ordinals(PyObject* tuple, std::vector<int>& out) {
    if (!PyTuple_Check(tuple)) {
        PyErr_SetString(PyExc_TypeError, "host table values must be tuples of ints");
        return false;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(tuple, i));
        if (v == -1 && PyErr_Occurred()) return false;
        out.push_back(static_cast<int>(v));
    }
    return true;
}

// -- URL normalization (query_for_url + normalize_url, simple form only) -------------------

inline bool is_hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

inline int hex_value(char c) {
    return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

inline bool unreserved(unsigned char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

// Python's str.strip() blanks, for ASCII.
inline bool py_space(unsigned char c) {
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

inline bool lower_equals(const char* s, size_t n, const char* word) {
    size_t m = std::strlen(word);
    if (n != m) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c | 0x20);
        if (c != word[i]) return false;
    }
    return true;
}

// url (ASCII) -> the normalized URL and the lower-case host, exactly as query_for_url makes
// them; false when the URL is not in the simple form (then Python decides).
bool normalize(const char* in, size_t n, std::string& url, std::string& host, std::string& prefixed,
               size_t* offsets = nullptr) {
    url.clear();
    size_t start = std::string::npos;
    for (size_t i = 0; i + 2 < n; i++) {
        if (in[i] == ':' && in[i + 1] == '/' && in[i + 2] == '/') {
            start = i;
            break;
        }
    }
    const char* s = in;
    if (start == std::string::npos) {  // no scheme: taken as https://
        prefixed.assign("https://");
        prefixed.append(in, n);
        s = prefixed.data();
        n = prefixed.size();
        start = 5;
    }
    const char* default_port = nullptr;
    if (lower_equals(s, start, "https") || lower_equals(s, start, "wss")) default_port = "443";
    else if (lower_equals(s, start, "http") || lower_equals(s, start, "ws")) default_port = "80";
    size_t begin = start + 3;
    size_t end = begin;
    while (end < n && s[end] != '/' && s[end] != '?' && s[end] != '#') end++;
    // authority = s[begin:end]
    size_t colon = end;
    for (size_t i = begin; i < end; i++) {
        char c = s[i];
        if (c == '@' || c == '%' || c == '[' || c == ']') return false;
        if (c == ':' && colon == end) colon = i;
    }
    size_t host_end = colon;
    if (host_end == begin) return false;  // empty host
    if (colon != end) {
        if (colon + 1 == end) return false;  // "host:" without a port
        for (size_t i = colon + 1; i < end; i++)
            if (s[i] < '0' || s[i] > '9') return false;  // includes a second ':'
    }
    if (s[host_end - 1] == '.' || py_space(static_cast<unsigned char>(s[begin])) ||
        py_space(static_cast<unsigned char>(s[host_end - 1])))
        return false;
    host.assign(s + begin, host_end - begin);
    for (char& c : host)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c | 0x20);
    url.append(s, host_end);  // scheme://host as written (case is left alone)
    if (colon != end) {
        size_t plen = end - colon - 1;
        if (!(default_port && plen == std::strlen(default_port) && std::memcmp(s + colon + 1, default_port, plen) == 0))
            url.append(s + colon, end - colon);
    }
    if (offsets) {
        offsets[0] = start;
        offsets[1] = host_end;
        offsets[2] = url.size();
    }
    // The rest: percent-escapes of unreserved characters decoded, other escapes upper-cased.
    size_t i = end;
    while (i < n) {
        const char* pct = static_cast<const char*>(std::memchr(s + i, '%', n - i));
        size_t stop = pct ? static_cast<size_t>(pct - s) : n;
        url.append(s + i, stop - i);
        i = stop;
        if (i >= n) break;
        if (i + 2 < n && is_hex(s[i + 1]) && is_hex(s[i + 2])) {
            unsigned char decoded = static_cast<unsigned char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
            if (unreserved(decoded)) {
                url.push_back(static_cast<char>(decoded));
            } else {
                url.push_back('%');
                char a = s[i + 1], b = s[i + 2];
                url.push_back(a >= 'a' ? static_cast<char>(a - 32) : a);
                url.push_back(b >= 'a' ? static_cast<char>(b - 32) : b);
            }
            i += 3;
        } else {
            url.push_back('%');
            i++;
        }
    }
    return true;
}

// -- the decision ---------------------------------------------------------------------------

// The ids of the patterns of RE2 set `which` that match, appended to out; false when RE2
// could not tell (then Python).
bool match_residual(const Engine& e, int which, Scratch& m, std::vector<int>& out) {
    const re2::RE2::Set* set = e.sets[which].get();
    if (!set) return true;
    m.local.clear();
    re2::RE2::Set::ErrorInfo info;
    if (!set->Match(re2::StringPiece(m.url), &m.local, &info)) return info.kind == re2::RE2::Set::kNoError;
    const std::vector<int>& pids = e.set_pids[which];
    for (int i : m.local) out.push_back(pids[static_cast<size_t>(i)]);
    return true;
}

inline bool alnum(char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

// Calls fn(begin, end) for every token of s: a maximal run of ASCII letters and digits.
// One definition for the URL scan (hot path) and for choosing a literal's inner token.
template <typename Fn>
inline void for_each_token(const std::string& s, Fn&& fn) {
    size_t i = 0, n = s.size();
    while (i < n) {
        if (!alnum(s[i])) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < n && alnum(s[j])) j++;
        fn(i, j);
        i = j;
    }
}

inline uint64_t token_hash(const char* s, size_t n) {  // FNV-1a
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ static_cast<unsigned char>(s[i])) * 1099511628211ULL;
    return h;
}

// FREE_SET: the literals the URL contains (found by token, confirmed by search) and the
// residual set's matches, sorted. KEYED_SET: the residual set's matches.
bool match_set(const Engine& e, int which, Scratch& m) {
    if (m.done[which]) return true;
    m.done[which] = true;
    std::vector<int>& out = m.matched[which];
    out.clear();
    if (which == FREE_SET && !e.token_index.empty()) {
        const std::string& u = m.lower;
        for_each_token(u, [&](size_t i, size_t j) {
            uint64_t h = token_hash(u.data() + i, j - i);
            size_t bit = h & (TOKEN_BITS - 1);
            if (!((e.token_filter[bit >> 6] >> (bit & 63)) & 1)) return;
            auto it = e.token_index.find(h);
            if (it == e.token_index.end()) return;
            for (int pid : it->second) {
                const std::string& lit = e.literal[static_cast<size_t>(pid)];
                if (u.find(lit) != std::string::npos) out.push_back(pid);
            }
        });
    }
    if (!match_residual(e, which, m, out)) return false;
    if (out.size() > 1) {
        std::sort(out.begin(), out.end());
        out.erase(std::unique(out.begin(), out.end()), out.end());
    }
    return true;
}

// The path glob c0*c1*...*ck against the rest of the URL r (lower case): c0 at the start,
// the middle chunks at their first place after it (the earliest placement leaves the most
// room), ck where the URL ends or a query/fragment follows (when the path has no '?').
bool glob_rest(const Wildcard& w, const char* r, size_t n) {
    if (w.empty_path) return true;  // (?:[/?#].*)?$: the rest is empty or starts with one of them
    const std::vector<std::string>& c = w.chunks;
    auto tail_ok = [&](size_t at) { return at == n || (w.query_allowed && (r[at] == '?' || r[at] == '#')); };
    const std::string& first = c[0];
    if (n < first.size() || std::memcmp(r, first.data(), first.size()) != 0) return false;
    if (c.size() == 1) return tail_ok(first.size());
    size_t pos = first.size();
    std::string_view rest(r, n);
    for (size_t i = 1; i + 1 < c.size(); i++) {
        size_t at = rest.find(c[i], pos);
        if (at == std::string_view::npos) return false;
        pos = at + c[i].size();
    }
    const std::string& last = c.back();
    if (!w.query_allowed) return n >= pos + last.size() && rest.compare(n - last.size(), last.size(), last) == 0;
    for (size_t at = rest.find(last, pos); at != std::string_view::npos; at = rest.find(last, at + 1))
        if (tail_ok(at + last.size())) return true;
    return false;
}

bool wildcard_matches(const Wildcard& w, const Scratch& m) {
    const char* u = m.lower.data();
    if (w.any_scheme) {  // [a-z][a-z0-9+.-]*
        if (m.scheme_end == 0 || !(u[0] >= 'a' && u[0] <= 'z')) return false;
        for (size_t i = 1; i < m.scheme_end; i++)
            if (!(alnum(u[i]) || u[i] == '+' || u[i] == '.' || u[i] == '-')) return false;
    } else if (m.scheme_end != w.scheme.size() || std::memcmp(u, w.scheme.data(), m.scheme_end) != 0) {
        return false;
    }
    if (!w.any_port) {  // :port exactly as the normalized URL has it (default ports are dropped)
        size_t len = m.rest - m.host_end;
        if (len != w.port.size() + 1 || std::memcmp(u + m.host_end + 1, w.port.data(), w.port.size()) != 0)
            return false;
    }
    return glob_rest(w, u + m.rest, m.lower.size() - m.rest);
}

// Does one of `ids` (sorted KEYED pattern ids) match the URL through the string matcher?
// Only the wildcards filed under the URL's host or one of its suffixes can.
bool keyed_wildcards(const Engine& e, const std::vector<int>& ids, Scratch& m) {
    if (!m.host_patterns_done) {
        m.host_patterns_done = true;
        m.host_patterns.clear();
        e.keyed_exact.find(m.host.data(), m.host.size(), HostTable::hash(m.host.data(), m.host.size()), m.host_patterns);
        if (!e.keyed_suffix.empty()) {
            size_t pos = 0;
            while (true) {
                const char* name = m.host.data() + pos;
                size_t len = m.host.size() - pos;
                e.keyed_suffix.find(name, len, HostTable::hash(name, len), m.host_patterns);
                size_t dot = m.host.find('.', pos);
                if (dot == std::string::npos) break;
                pos = dot + 1;
            }
        }
    }
    for (int pid : m.host_patterns) {
        if (std::binary_search(ids.begin(), ids.end(), pid) && wildcard_matches(*e.wildcard[static_cast<size_t>(pid)], m))
            return true;
    }
    return false;
}

inline bool any_in(const std::vector<int>& matched, const std::vector<int>& ids) {
    for (int m : matched)
        if (std::binary_search(ids.begin(), ids.end(), m)) return true;
    return false;
}

inline bool contains(const std::vector<int>& v, int x) {
    return std::find(v.begin(), v.end(), x) != v.end();
}

// 1: *out is the verdict (new reference); 0: Python decides; -1: a Python error is set.
int decide_core(Engine& e, PyObject* url_obj, long stage, const ViewObject* view, long long now_us, PyObject** out) {
    if (view->flags->size() != e.rules.size()) {
        PyErr_SetString(PyExc_ValueError, "view was made for another engine");
        return -1;
    }
    if (!PyUnicode_IS_ASCII(url_obj)) return 0;  // IDN and other non-ASCII: Python
    Scratch& m = e.scratch;
    const char* raw = reinterpret_cast<const char*>(PyUnicode_1BYTE_DATA(url_obj));
    size_t n = static_cast<size_t>(PyUnicode_GET_LENGTH(url_obj));
    for (size_t i = 0; i < n; i++)
        if (raw[i] <= ' ' || raw[i] == 0x7f) return 0;  // blanks and control characters: Python
    size_t offsets[3];
    if (!normalize(raw, n, m.url, m.host, m.prefixed, offsets)) return 0;
    m.scheme_end = offsets[0];
    m.host_end = offsets[1];
    m.rest = offsets[2];
    m.lower.assign(m.url);
    for (char& c : m.lower)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c | 0x20);
    m.done[0] = m.done[1] = false;
    m.host_patterns_done = false;

    // Rules found through the host tables: the exact name, then every suffix.
    // The names' slots are fetched together first: a million-name table misses the cache on
    // every probe, and overlapping the misses costs about one instead of one per name.
    std::vector<int>& hits = m.hits;
    hits.clear();
    constexpr size_t MAX_LABELS = 32;
    size_t starts[MAX_LABELS];
    uint64_t hashes[MAX_LABELS];
    size_t labels = 0;
    for (size_t pos = 0;;) {
        if (labels == MAX_LABELS) break;
        starts[labels] = pos;
        hashes[labels] = HostTable::hash(m.host.data() + pos, m.host.size() - pos);
        e.suffix.prefetch(hashes[labels]);
        labels++;
        size_t dot = m.host.find('.', pos);
        if (dot == std::string::npos) break;
        pos = dot + 1;
    }
    e.exact.prefetch(hashes[0]);
    e.exact.find(m.host.data(), m.host.size(), hashes[0], hits);
    for (size_t l = 0; l < labels; l++)
        e.suffix.find(m.host.data() + starts[l], m.host.size() - starts[l], hashes[l], hits);
    if (labels == MAX_LABELS) {  // a name with more labels than that: the rest unprefetched
        size_t pos = starts[MAX_LABELS - 1];
        while (true) {
            size_t dot = m.host.find('.', pos);
            if (dot == std::string::npos) break;
            pos = dot + 1;
            const char* name = m.host.data() + pos;
            size_t len = m.host.size() - pos;
            e.suffix.find(name, len, HostTable::hash(name, len), hits);
        }
    }
    std::vector<int>& candidates = m.candidates;
    candidates.assign(hits.begin(), hits.end());
    candidates.insert(candidates.end(), view->generic->begin(), view->generic->end());
    if (e.url_only.size() > e.lazy_limit) {
        // Many URL-routed rules: ask the free set first and try only the rules it names.
        if (!match_set(e, FREE_SET, m)) return 0;
        for (int pid : m.matched[FREE_SET]) {
            const std::vector<int>& rs = e.pattern_rules[static_cast<size_t>(pid)];
            candidates.insert(candidates.end(), rs.begin(), rs.end());
        }
    } else {
        candidates.insert(candidates.end(), e.url_only.begin(), e.url_only.end());
    }
    if (candidates.size() > 1) {
        std::sort(candidates.begin(), candidates.end());
        candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
    }
    const std::vector<uint8_t>& flags = *view->flags;
    for (int ordinal : candidates) {
        size_t o = static_cast<size_t>(ordinal);
        if (o >= e.rules.size()) {
            PyErr_SetString(PyExc_IndexError, "rule ordinal out of range");
            return -1;
        }
        uint8_t f = flags[o];
        if (f & FLAG_DEAD) continue;
        const Rule& rule = e.rules[o];
        if (rule.python || (f & FLAG_UNSURE)) return 0;
        if (rule.host_only) {
            if (!contains(hits, ordinal)) continue;
        } else {
            if (rule.has_expiry && now_us >= rule.expires_us) continue;
            bool holds = true;
            for (const Check& c : rule.checks) {
                if (c.type == CHECK_HOST) {
                    holds = contains(hits, ordinal);
                } else if (c.type == CHECK_HOST_OR_FREE) {
                    holds = contains(hits, ordinal);
                    if (!holds) {
                        if (!match_set(e, FREE_SET, m)) return 0;
                        holds = any_in(m.matched[FREE_SET], c.ids);
                    }
                } else if (c.set == KEYED_SET) {
                    holds = keyed_wildcards(e, c.ids, m);
                    if (!holds && c.residual) {
                        if (!match_set(e, KEYED_SET, m)) return 0;
                        holds = any_in(m.matched[KEYED_SET], c.ids);
                    }
                } else {
                    if (!match_set(e, FREE_SET, m)) return 0;
                    holds = any_in(m.matched[FREE_SET], c.ids);
                }
                if (!holds) break;
            }
            if (!holds) continue;
        }
        *out = PyTuple_GET_ITEM(e.verdicts[stage], ordinal);
        Py_INCREF(*out);
        return 1;
    }
    *out = e.defaults[stage];
    Py_INCREF(*out);
    return 1;
}

// decide(url, stage, view, now_us) -> Verdict | None (None: the Python engine decides)
PyObject* engine_decide(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "decide(url, stage, view, now_us)");
        return nullptr;
    }
    Engine& e = *reinterpret_cast<EngineObject*>(self)->engine;
    if (!PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "url must be a str");
        return nullptr;
    }
    long stage = PyLong_AsLong(args[1]);
    if (stage < 0 || stage >= STAGES) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "stage index out of range");
        return nullptr;
    }
    if (Py_TYPE(args[2]) != &ViewType) {
        PyErr_SetString(PyExc_TypeError, "view must be a View of this engine");
        return nullptr;
    }
    long long now_us = PyLong_AsLongLong(args[3]);
    if (now_us == -1 && PyErr_Occurred()) return nullptr;
    PyObject* out = nullptr;
    int r = decide_core(e, args[0], stage, reinterpret_cast<ViewObject*>(args[2]), now_us, &out);
    if (r < 0) return nullptr;
    if (r == 0) Py_RETURN_NONE;
    return out;
}

// decide_url(url, device, stage=Stage.REQUEST, method="GET", now=None, **extra) -> Verdict:
// PolicySnapshot.decide_url with the whole common case in this one call. Whatever is not
// decided here — another stage, extra query fields, a URL or rule the native code does not
// evaluate — goes to the Python decide_url with the arguments exactly as given.
PyObject* engine_decide_url(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
    EngineObject* eo = reinterpret_cast<EngineObject*>(self);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *url = nargs > 0 ? args[0] : nullptr, *device = nargs > 1 ? args[1] : nullptr;
    PyObject* stage_obj = nargs > 2 ? args[2] : nullptr;
    PyObject* method = nargs > 3 ? args[3] : nullptr;
    PyObject* now = nargs > 4 ? args[4] : nullptr;
    bool native = nargs >= 2 && nargs <= 5;
    if (native && kwnames) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw && native; i++) {
            PyObject* name = PyTuple_GET_ITEM(kwnames, i);
            PyObject* value = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(name, "now") == 0 && !now) now = value;
            else if (PyUnicode_CompareWithASCIIString(name, "stage") == 0 && !stage_obj) stage_obj = value;
            else if (PyUnicode_CompareWithASCIIString(name, "method") == 0 && !method) method = value;
            else native = false;  // extra query fields (or a mistake): Python
        }
    }
    if (native && (!PyUnicode_Check(url) || (method && !PyUnicode_Check(method)))) native = false;
    long stage = 0;
    if (native && stage_obj) {
        if (stage_obj == eo->stages[0]) stage = 0;
        else if (stage_obj == eo->stages[1]) stage = 1;
        else native = false;
    }
    long long now_us = eo->compiled_us;
    if (native && now && now != Py_None && eo->micros != Py_None) {
        PyObject* us = PyObject_CallOneArg(eo->micros, now);
        if (!us) {
            PyErr_Clear();  // e.g. a naive datetime: Python decides (and says what is wrong)
            native = false;
        } else {
            now_us = PyLong_AsLongLong(us);
            Py_DECREF(us);
            if (now_us == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                native = false;
            }
        }
    }
    if (native) {
        PyObject* view = nullptr;
        if (device == eo->last_device && eo->last_view) {
            view = eo->last_view;
            Py_INCREF(view);
        } else {
            view = PyObject_CallOneArg(eo->view_factory, device);
            if (!view) return nullptr;
            if (Py_TYPE(view) != &ViewType) {
                Py_DECREF(view);
                PyErr_SetString(PyExc_TypeError, "view factory must return a View");
                return nullptr;
            }
            PyObject* old_device = eo->last_device;
            PyObject* old_view = eo->last_view;
            Py_INCREF(device);
            Py_INCREF(view);
            eo->last_device = device;
            eo->last_view = view;
            Py_XDECREF(old_device);
            Py_XDECREF(old_view);
        }
        PyObject* out = nullptr;
        int r = decide_core(*eo->engine, url, stage, reinterpret_cast<ViewObject*>(view), now_us, &out);
        Py_DECREF(view);
        if (r < 0) return nullptr;
        if (r > 0) return out;
    }
    return PyObject_Vectorcall(eo->fallback, args, nargsf, kwnames);
}

// -- View -----------------------------------------------------------------------------------

void view_dealloc(PyObject* self) {
    ViewObject* v = reinterpret_cast<ViewObject*>(self);
    delete v->flags;
    delete v->generic;
    Py_TYPE(self)->tp_free(self);
}

// engine.view(dead, unsure, generic) -> View: one device's dead rules, the rules whose
// device conditions could not be settled (Python decides when one is reached), and the
// device-wide rules it still has to try.
PyObject* engine_view(PyObject* self, PyObject* args) {
    const Engine& e = *reinterpret_cast<EngineObject*>(self)->engine;
    PyObject *dead, *unsure, *generic;
    if (!PyArg_ParseTuple(args, "OOO", &dead, &unsure, &generic)) return nullptr;
    std::vector<int> d, u, g;
    if (!int_list(dead, d) || !int_list(unsure, u) || !int_list(generic, g)) return nullptr;
    auto flags = std::make_unique<std::vector<uint8_t>>(e.rules.size(), 0);
    for (int o : d) {
        if (o < 0 || static_cast<size_t>(o) >= flags->size()) return PyErr_Format(PyExc_IndexError, "rule %d", o);
        (*flags)[static_cast<size_t>(o)] |= FLAG_DEAD;
    }
    for (int o : u) {
        if (o < 0 || static_cast<size_t>(o) >= flags->size()) return PyErr_Format(PyExc_IndexError, "rule %d", o);
        (*flags)[static_cast<size_t>(o)] |= FLAG_UNSURE;
    }
    ViewObject* v = PyObject_New(ViewObject, &ViewType);
    if (!v) return nullptr;
    v->flags = flags.release();
    v->generic = new std::vector<int>(std::move(g));
    return reinterpret_cast<PyObject*>(v);
}

// -- Engine ---------------------------------------------------------------------------------

bool parse_check(PyObject* spec, Check& c) {
    // ("host",) | ("host_or_free", ids) | ("urls", set, ids)
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1) {
        PyErr_SetString(PyExc_TypeError, "check spec must be a non-empty tuple");
        return false;
    }
    const char* kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 0));
    if (!kind) return false;
    c.residual = true;
    if (std::strcmp(kind, "host") == 0) {
        c.type = CHECK_HOST;
        return true;
    }
    if (std::strcmp(kind, "host_or_free") == 0 && PyTuple_GET_SIZE(spec) == 2) {
        c.type = CHECK_HOST_OR_FREE;
        c.set = FREE_SET;
        if (!int_list(PyTuple_GET_ITEM(spec, 1), c.ids)) return false;
    } else if (std::strcmp(kind, "urls") == 0 && PyTuple_GET_SIZE(spec) == 3) {
        c.type = CHECK_URLS;
        long which = PyLong_AsLong(PyTuple_GET_ITEM(spec, 1));
        if (which != FREE_SET && which != KEYED_SET) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad set index");
            return false;
        }
        c.set = static_cast<int>(which);
        if (!int_list(PyTuple_GET_ITEM(spec, 2), c.ids)) return false;
    } else {
        PyErr_Format(PyExc_ValueError, "unknown check kind %s", kind);
        return false;
    }
    std::sort(c.ids.begin(), c.ids.end());
    return true;
}

bool parse_rule(PyObject* spec, Rule& r) {
    // (python: bool, host_only: bool, expires_us: int | None, checks: tuple)
    PyObject *python, *host_only, *expires, *checks;
    if (!PyArg_ParseTuple(spec, "OOOO", &python, &host_only, &expires, &checks)) return false;
    r.python = PyObject_IsTrue(python) == 1;
    r.host_only = PyObject_IsTrue(host_only) == 1;
    r.has_expiry = expires != Py_None;
    r.expires_us = 0;
    if (r.has_expiry) {
        r.expires_us = PyLong_AsLongLong(expires);
        if (r.expires_us == -1 && PyErr_Occurred()) return false;
    }
    PyObject* fast = PySequence_Fast(checks, "checks must be a sequence");
    if (!fast) return false;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
        Check c{};
        if (!parse_check(PySequence_Fast_GET_ITEM(fast, i), c)) {
            Py_DECREF(fast);
            return false;
        }
        r.checks.push_back(std::move(c));
    }
    Py_DECREF(fast);
    return true;
}

// The RE2 set of the patterns of set `which` that neither string matcher takes.
bool build_set(Engine& e, int which, PyObject* patterns, const std::vector<int>& members) {
    std::vector<int>& pids = e.set_pids[which];
    pids.clear();
    for (int pid : members) {
        bool by_string = which == FREE_SET ? !e.literal[static_cast<size_t>(pid)].empty()
                                           : static_cast<bool>(e.wildcard[static_cast<size_t>(pid)]);
        if (!by_string) pids.push_back(pid);
    }
    if (pids.empty()) return true;
    auto set = std::make_unique<re2::RE2::Set>(e.options, re2::RE2::UNANCHORED);
    for (size_t index = 0; index < pids.size(); index++) {
        Py_ssize_t len = 0;
        const char* text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(patterns, pids[index]), &len);
        if (!text) return false;
        std::string error;
        if (set->Add(re2::StringPiece(text, static_cast<size_t>(len)), &error) != static_cast<int>(index)) {
            PyErr_Format(PyExc_ValueError, "RE2 refused pattern %d: %s", pids[index], error.c_str());
            return false;
        }
    }
    if (!set->Compile()) {
        PyErr_SetString(PyExc_ValueError, "RE2 set does not compile (memory budget)");
        return false;
    }
    e.sets[which] = std::move(set);
    return true;
}

inline bool plain_host(const char* s, Py_ssize_t n) {
    if (n == 0) return false;
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_')) return false;
    }
    return true;
}

inline bool printable(const std::string& s) {
    for (char c : s)
        if (c <= ' ' || c == 0x7f) return false;  // also every byte >= 0x80 (char is signed)
    return true;
}

std::string lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c | 0x20);
    return s;
}

// A literal regex: printable ASCII without an RE2 metacharacter. Its longest inner token
// (letters and digits with a separator inside the literal on each side), or "" for none.
std::string inner_token(const std::string& lit) {
    static const char* meta = "\\^$.|?*+()[]{}";
    if (lit.empty() || !printable(lit) || lit.find_first_of(meta) != std::string::npos) return "";
    std::string best;
    for_each_token(lit, [&](size_t i, size_t j) {
        if (i > 0 && j < lit.size() && j - i > best.size()) best = lit.substr(i, j - i);
    });
    return best;
}

// The string matchers' tables: FREE literals by inner token; KEYED wildcards with a plain
// host key and ASCII parts by host (pattern_hosts: {pid: (host, is_suffix, scheme, port,
// path)}).
bool index_patterns(Engine& e, PyObject* patterns, const std::vector<int>& free_members,
                    const std::vector<int>& keyed_members, PyObject* pattern_hosts) {
    size_t count = static_cast<size_t>(PyTuple_GET_SIZE(patterns));
    e.literal.assign(count, std::string());
    e.wildcard.clear();
    e.wildcard.resize(count);
    for (int pid : free_members) {
        if (pid < 0 || static_cast<size_t>(pid) >= count) {
            PyErr_SetString(PyExc_IndexError, "pattern id out of range");
            return false;
        }
        Py_ssize_t len = 0;
        const char* text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(patterns, pid), &len);
        if (!text) return false;
        std::string lit = lower(std::string(text, static_cast<size_t>(len)));
        std::string token = inner_token(lit);
        if (token.empty()) continue;
        e.literal[static_cast<size_t>(pid)] = lit;
        uint64_t h = token_hash(token.data(), token.size());
        e.token_index[h].push_back(pid);
        size_t bit = h & (TOKEN_BITS - 1);
        if (e.token_filter.empty()) e.token_filter.assign(TOKEN_BITS / 64, 0);
        e.token_filter[bit >> 6] |= uint64_t{1} << (bit & 63);
    }
    std::vector<bool> keyed(count, false);
    for (int pid : keyed_members) {
        if (pid < 0 || static_cast<size_t>(pid) >= count) {
            PyErr_SetString(PyExc_IndexError, "pattern id out of range");
            return false;
        }
        keyed[static_cast<size_t>(pid)] = true;
    }
    std::unordered_map<std::string, std::vector<int>> by_host[2];  // exact, suffix
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(pattern_hosts, &pos, &key, &value)) {
        long pid = PyLong_AsLong(key);
        if (pid == -1 && PyErr_Occurred()) return false;
        if (pid < 0 || static_cast<size_t>(pid) >= count) {
            PyErr_SetString(PyExc_IndexError, "pattern id out of range");
            return false;
        }
        if (!keyed[static_cast<size_t>(pid)]) continue;
        PyObject *host_obj, *suffix_obj, *scheme_obj, *port_obj, *path_obj;
        if (!PyArg_ParseTuple(value, "OOOOO", &host_obj, &suffix_obj, &scheme_obj, &port_obj, &path_obj)) return false;
        Py_ssize_t hlen = 0;
        const char* host = PyUnicode_AsUTF8AndSize(host_obj, &hlen);
        if (!host) return false;
        if (!plain_host(host, hlen)) continue;
        auto w = std::make_unique<Wildcard>();
        w->any_scheme = scheme_obj == Py_None;
        if (!w->any_scheme) {
            const char* sc = PyUnicode_AsUTF8(scheme_obj);
            if (!sc) return false;
            w->scheme = lower(sc);
        }
        w->any_port = port_obj == Py_None;
        if (!w->any_port) {
            const char* pt = PyUnicode_AsUTF8(port_obj);
            if (!pt) return false;
            w->port = pt;
        }
        const char* path = PyUnicode_AsUTF8(path_obj);
        if (!path) return false;
        std::string p(path);
        if (!printable(w->scheme) || !printable(w->port) || !printable(p)) continue;  // RE2 decides those
        w->empty_path = p.empty();
        w->query_allowed = p.find('?') == std::string::npos;
        p = lower(p);
        size_t start = 0;
        while (true) {
            size_t star = p.find('*', start);
            w->chunks.push_back(p.substr(start, star == std::string::npos ? std::string::npos : star - start));
            if (star == std::string::npos) break;
            start = star + 1;
        }
        e.wildcard[static_cast<size_t>(pid)] = std::move(w);
        by_host[PyObject_IsTrue(suffix_obj) == 1 ? 1 : 0][std::string(host, static_cast<size_t>(hlen))].push_back(
            static_cast<int>(pid));
    }
    HostTable* tables[2] = {&e.keyed_exact, &e.keyed_suffix};
    for (int t = 0; t < 2; t++) {
        tables[t]->reserve(by_host[t].size());
        for (auto& [host, pids] : by_host[t]) {
            std::sort(pids.begin(), pids.end());
            tables[t]->insert(host.data(), host.size(), pids.data(), pids.size());
        }
    }
    for (Rule& r : e.rules) {
        for (Check& c : r.checks) {
            if (c.type != CHECK_URLS || c.set != KEYED_SET) continue;
            c.residual = std::any_of(c.ids.begin(), c.ids.end(), [&](int pid) {
                return pid < 0 || static_cast<size_t>(pid) >= count || !e.wildcard[static_cast<size_t>(pid)];
            });
        }
    }
    return true;
}

PyObject* engine_new_impl(PyTypeObject* type, PyObject* args, PyObject* kwds) {
    static const char* kwlist[] = {"rules", "exact", "suffix", "url_only", "pattern_rules", "lazy_limit",
                                   "patterns", "free_pids", "keyed_pids", "pattern_hosts", "verdicts", "defaults",
                                   "stages", "fallback", "view_factory", "micros", "compiled_us", nullptr};
    PyObject *rules, *exact, *suffix, *url_only, *pattern_rules, *patterns, *free_pids, *keyed_pids, *pattern_hosts,
        *verdicts, *defaults, *stages, *fallback, *view_factory, *micros;
    Py_ssize_t lazy_limit;
    long long compiled_us;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O!OOnO!OOO!O!O!O!OOOL", const_cast<char**>(kwlist), &rules,
                                     &PyDict_Type, &exact, &PyDict_Type, &suffix, &url_only, &pattern_rules,
                                     &lazy_limit, &PyTuple_Type, &patterns, &free_pids, &keyed_pids, &PyDict_Type,
                                     &pattern_hosts, &PyTuple_Type, &verdicts, &PyTuple_Type, &defaults,
                                     &PyTuple_Type, &stages, &fallback, &view_factory, &micros, &compiled_us))
        return nullptr;
    if (PyTuple_GET_SIZE(stages) != STAGES || !PyCallable_Check(fallback) || !PyCallable_Check(view_factory) ||
        (micros != Py_None && !PyCallable_Check(micros))) {
        PyErr_SetString(PyExc_TypeError, "stages: one per native stage; fallback, view_factory (and micros): callables");
        return nullptr;
    }
    auto e = std::make_unique<Engine>();
    // The options compiler._url_set gives the Python binding's set.
    e->options.set_max_mem(int64_t{1} << 30);
    e->options.set_case_sensitive(false);
    e->options.set_log_errors(false);
    PyObject* fast = PySequence_Fast(rules, "rules must be a sequence");
    if (!fast) return nullptr;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    e->rules.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!parse_rule(PySequence_Fast_GET_ITEM(fast, i), e->rules[static_cast<size_t>(i)])) {
            Py_DECREF(fast);
            return nullptr;
        }
    }
    Py_DECREF(fast);
    if (!e->exact.build(exact) || !e->suffix.build(suffix)) return nullptr;
    if (!int_list(url_only, e->url_only)) return nullptr;
    e->lazy_limit = static_cast<size_t>(lazy_limit < 0 ? 0 : lazy_limit);
    PyObject* pr = PySequence_Fast(pattern_rules, "pattern_rules must be a sequence");
    if (!pr) return nullptr;
    e->pattern_rules.resize(static_cast<size_t>(PySequence_Fast_GET_SIZE(pr)));
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pr); i++) {
        if (!int_list(PySequence_Fast_GET_ITEM(pr, i), e->pattern_rules[static_cast<size_t>(i)])) {
            Py_DECREF(pr);
            return nullptr;
        }
    }
    Py_DECREF(pr);
    std::vector<int> free_members, keyed_members;
    if ((free_pids != Py_None && !int_list(free_pids, free_members)) ||
        (keyed_pids != Py_None && !int_list(keyed_pids, keyed_members)))
        return nullptr;
    if (!index_patterns(*e, patterns, free_members, keyed_members, pattern_hosts) ||
        !build_set(*e, FREE_SET, patterns, free_members) || !build_set(*e, KEYED_SET, patterns, keyed_members))
        return nullptr;
    if (PyTuple_GET_SIZE(verdicts) != STAGES || PyTuple_GET_SIZE(defaults) != STAGES) {
        PyErr_SetString(PyExc_ValueError, "verdicts and defaults need one entry per stage");
        return nullptr;
    }
    for (int s = 0; s < STAGES; s++) {
        PyObject* vs = PyTuple_GET_ITEM(verdicts, s);
        if (!PyTuple_Check(vs) || PyTuple_GET_SIZE(vs) != n) {
            PyErr_SetString(PyExc_ValueError, "verdicts[stage] must be a tuple with one Verdict per rule");
            return nullptr;
        }
        Py_INCREF(vs);
        e->verdicts[s] = vs;
        Py_INCREF(PyTuple_GET_ITEM(defaults, s));
        e->defaults[s] = PyTuple_GET_ITEM(defaults, s);
    }
    EngineObject* self = reinterpret_cast<EngineObject*>(type->tp_alloc(type, 0));
    if (!self) return nullptr;
    self->engine = e.release();
    for (int s = 0; s < STAGES; s++) {
        self->stages[s] = PyTuple_GET_ITEM(stages, s);
        Py_INCREF(self->stages[s]);
    }
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(view_factory);
    self->view_factory = view_factory;
    Py_INCREF(micros);
    self->micros = micros;
    self->compiled_us = compiled_us;
    self->last_device = nullptr;
    self->last_view = nullptr;
    return reinterpret_cast<PyObject*>(self);
}

// The engine refers back to its snapshot (fallback, view_factory are its bound methods)
// and the snapshot to the engine: a cycle the garbage collector must be able to break.
int engine_traverse(PyObject* self, visitproc visit, void* arg) {
    EngineObject* eo = reinterpret_cast<EngineObject*>(self);
    Py_VISIT(eo->fallback);
    Py_VISIT(eo->view_factory);
    Py_VISIT(eo->micros);
    Py_VISIT(eo->last_device);
    Py_VISIT(eo->last_view);
    for (int s = 0; s < STAGES; s++) Py_VISIT(eo->stages[s]);
    if (eo->engine) {
        for (int s = 0; s < STAGES; s++) {
            Py_VISIT(eo->engine->verdicts[s]);
            Py_VISIT(eo->engine->defaults[s]);
        }
    }
    return 0;
}

int engine_clear(PyObject* self) {
    EngineObject* eo = reinterpret_cast<EngineObject*>(self);
    Py_CLEAR(eo->fallback);
    Py_CLEAR(eo->view_factory);
    Py_CLEAR(eo->micros);
    Py_CLEAR(eo->last_device);
    Py_CLEAR(eo->last_view);
    for (int s = 0; s < STAGES; s++) Py_CLEAR(eo->stages[s]);
    delete eo->engine;  // drops its references to the tables and verdicts
    eo->engine = nullptr;
    return 0;
}

void engine_dealloc(PyObject* self) {
    PyObject_GC_UnTrack(self);
    engine_clear(self);
    Py_TYPE(self)->tp_free(self);
}

PyObject* engine_guard(PyObject* self) {
    if (!reinterpret_cast<EngineObject*>(self)->engine) {
        PyErr_SetString(PyExc_RuntimeError, "engine was cleared");
        return nullptr;
    }
    return self;
}

// No C++ exception (std::bad_alloc, a table over 4 GiB) may cross into the interpreter.
template <typename F>
PyObject* guarded(F f) {
    try {
        return f();
    } catch (const std::bad_alloc&) {
        return PyErr_NoMemory();
    } catch (const std::exception& ex) {
        PyErr_SetString(PyExc_RuntimeError, ex.what());
        return nullptr;
    }
}

PyObject* engine_new(PyTypeObject* type, PyObject* args, PyObject* kwds) {
    return guarded([&] { return engine_new_impl(type, args, kwds); });
}

PyObject* engine_decide_checked(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    if (!engine_guard(self)) return nullptr;
    return guarded([&] { return engine_decide(self, args, nargs); });
}

PyObject* engine_decide_url_checked(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
    if (!engine_guard(self)) return nullptr;
    return guarded([&] { return engine_decide_url(self, args, nargsf, kwnames); });
}

PyObject* engine_view_checked(PyObject* self, PyObject* args) {
    if (!engine_guard(self)) return nullptr;
    return guarded([&] { return engine_view(self, args); });
}

// normalize(url) -> (normalized url, host) | None: the simple-form normalization, exposed
// for the differential tests against query_for_url.
PyObject* py_normalize(PyObject*, PyObject* arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "url must be a str");
        return nullptr;
    }
    if (!PyUnicode_IS_ASCII(arg)) Py_RETURN_NONE;
    std::string url, host, prefixed;
    if (!normalize(reinterpret_cast<const char*>(PyUnicode_1BYTE_DATA(arg)),
                   static_cast<size_t>(PyUnicode_GET_LENGTH(arg)), url, host, prefixed))
        Py_RETURN_NONE;
    return Py_BuildValue("(s#s#)", url.data(), static_cast<Py_ssize_t>(url.size()), host.data(),
                         static_cast<Py_ssize_t>(host.size()));
}

PyMethodDef engine_methods[] = {
    {"decide", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(engine_decide_checked)), METH_FASTCALL,
     "decide(url, stage, view, now_us) -> Verdict | None (None: the Python engine decides)"},
    {"decide_url", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(engine_decide_url_checked)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_url(url, device, stage=Stage.REQUEST, method='GET', now=None, **extra) -> Verdict"},
    {"view", engine_view_checked, METH_VARARGS, "view(dead, unsure, generic) -> View"},
    {nullptr, nullptr, 0, nullptr},
};

PyMethodDef module_methods[] = {
    {"normalize", py_normalize, METH_O, "normalize(url) -> (url, host) | None"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_fastpath", "Native fast path of the Kanmon policy decision (see _fastpath.cpp).",
    -1, module_methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__fastpath(void) {
    ViewType.tp_dealloc = view_dealloc;
    ViewType.tp_flags = Py_TPFLAGS_DEFAULT;
    ViewType.tp_doc = "One device's view of an Engine (dead and unsettled rules).";
    EngineType.tp_dealloc = engine_dealloc;
    EngineType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
    EngineType.tp_traverse = engine_traverse;
    EngineType.tp_clear = engine_clear;
    EngineType.tp_doc = "A snapshot's routing tables, URL sets and verdicts, for decide().";
    EngineType.tp_methods = engine_methods;
    EngineType.tp_new = engine_new;
    if (PyType_Ready(&ViewType) < 0 || PyType_Ready(&EngineType) < 0) return nullptr;
    PyObject* m = PyModule_Create(&module_def);
    if (!m) return nullptr;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", reinterpret_cast<PyObject*>(&EngineType)) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return nullptr;
    }
    Py_INCREF(&ViewType);
    if (PyModule_AddObject(m, "View", reinterpret_cast<PyObject*>(&ViewType)) < 0) {
        Py_DECREF(&ViewType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
