#include "detail/json.h"

#include <cctype>
#include <cstdio>
#include <cstring>
#include <sstream>

#include <c10/util/Exception.h>

namespace torch_mp::detail {

const Json& Json::at(const std::string& key) const {
  const Json* value = find(key);
  TORCH_CHECK_VALUE(value != nullptr, "torch_mp::load: the checkpoint's JSON lacks \"", key, "\"");
  return *value;
}

int64_t Json::integer() const {
  TORCH_CHECK_VALUE(kind == Kind::Number, "torch_mp::load: expected a number in the checkpoint's JSON");
  return std::stoll(text);
}

namespace {

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json parse() {
    Json value = parse_value();
    TORCH_CHECK_VALUE(peek() == '\0', "torch_mp::load: trailing characters in JSON at offset ", pos_);
    return value;
  }

 private:
  char peek() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
    return pos_ < text_.size() ? text_[pos_] : '\0';
  }
  void expect(char c) {
    TORCH_CHECK_VALUE(peek() == c, "torch_mp::load: expected '", c, "' in JSON at offset ", pos_);
    ++pos_;
  }
  bool next_item(char close) {
    if (peek() == ',') {
      ++pos_;
      return true;
    }
    expect(close);
    return false;
  }
  bool word(const char* literal) {
    size_t length = std::strlen(literal);
    if (text_.compare(pos_, length, literal) != 0) {
      return false;
    }
    pos_ += length;
    return true;
  }

  Json parse_value() {
    Json value;
    const char c = peek();
    const size_t start = pos_;
    if (c == '{') {
      value.kind = Json::Kind::Object;
      ++pos_;
      if (peek() == '}') {
        ++pos_;
        return value;
      }
      do {
        std::string key = parse_string();
        expect(':');
        value.members.emplace_back(std::move(key), parse_value());
      } while (next_item('}'));
    } else if (c == '[') {
      value.kind = Json::Kind::Array;
      ++pos_;
      if (peek() == ']') {
        ++pos_;
        return value;
      }
      do {
        value.items.push_back(parse_value());
      } while (next_item(']'));
    } else if (c == '"') {
      value.kind = Json::Kind::String;
      value.text = parse_string();
    } else if (word("true") || word("false")) {
      value.kind = Json::Kind::Bool;
      value.text = text_.substr(start, pos_ - start);
    } else if (word("null")) {
      value.kind = Json::Kind::Null;
    } else if (word("NaN") || word("Infinity") || word("-Infinity")) { // Python's json writes these
      value.kind = Json::Kind::Number;
      value.text = text_.substr(start, pos_ - start);
    } else {
      while (pos_ < text_.size() && std::strchr("+-0123456789.eE", text_[pos_]) != nullptr) {
        ++pos_;
      }
      TORCH_CHECK_VALUE(pos_ > start, "torch_mp::load: unexpected '", c, "' in JSON at offset ", start);
      value.kind = Json::Kind::Number;
      value.text = text_.substr(start, pos_ - start);
    }
    return value;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      TORCH_CHECK_VALUE(pos_ < text_.size(), "torch_mp::load: unterminated string in JSON");
      char c = text_[pos_++];
      if (c == '"') {
        return out;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      TORCH_CHECK_VALUE(pos_ < text_.size(), "torch_mp::load: unterminated string in JSON");
      char escaped = text_[pos_++];
      switch (escaped) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          // Python's json writes non-ASCII as \uXXXX; surrogate pairs are joined.
          uint32_t code = std::stoul(text_.substr(pos_, 4), nullptr, 16);
          pos_ += 4;
          if (code >= 0xD800 && code < 0xDC00 && text_.compare(pos_, 2, "\\u") == 0) {
            code = 0x10000 + ((code - 0xD800) << 10) + (std::stoul(text_.substr(pos_ + 2, 4), nullptr, 16) - 0xDC00);
            pos_ += 6;
          }
          append_utf8(out, code);
          break;
        }
        default: out += escaped; // " \ /
      }
    }
  }

  static void append_utf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  const std::string& text_;
  size_t pos_ = 0;
};

} // namespace

Json parse_json(const std::string& text) {
  return JsonParser(text).parse();
}

std::string quoted(const std::string& text) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
      out << escaped;
    } else {
      out << c;
    }
  }
  out << '"';
  return out.str();
}

std::string json_list(c10::IntArrayRef values) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < values.size(); ++i) {
    out << (i ? "," : "") << values[i];
  }
  out << ']';
  return out.str();
}

} // namespace torch_mp::detail
